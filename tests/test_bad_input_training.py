"""`python -m tdm_train` on bad input: each case fails before any model loads where the input alone
shows it is wrong, with its exit code (tdm_train/errors.py), a message naming the culprit, no
traceback, and nothing on disk changed; runs are never overwritten or mixed, and a damaged
checkpoint is skipped for the newest complete one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import peft  # noqa: F401
import transformers  # noqa: F401

from disk_state import snapshot
from tdm_train.errors import EXIT_BAD_FILE, EXIT_BAD_INPUT, EXIT_OUTPUT
from tdm_train.tiny_models import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--resolution", "64", "--lora_rank", "4", "--lora_alpha", "4", "--max_train_steps", "1"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    return {bb: save_tiny_pipeline(base / bb, bb) for bb in ("sdxl", "pixart", "cogvideox")}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a photo of a cat\na red horse on the moon\n")
    return path


def run(*args, env=None, python_prefix=None):
    command = [sys.executable, "-m", "tdm_train", *map(str, args)]
    if python_prefix is not None:  # code run first in the same process (fault injection)
        command = [sys.executable, "-c", python_prefix + "\nfrom tdm_train.cli import main\nimport sys\n"
                   "sys.exit(main(sys.argv[1:]))", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def assert_refused(result, code: int, *culprits: str):
    output = result.stdout + result.stderr
    assert result.returncode == code, (result.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    for culprit in culprits:
        assert culprit in result.stderr, (culprit, result.stderr[-2000:])


def damaged_copy(source: Path, target: Path, what: str) -> Path:
    shutil.copytree(source, target)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    if what == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif what == "random":
        weights.write_bytes(os.urandom(4096))
    elif what == "no scheduler":
        shutil.rmtree(target / "scheduler")
    elif what == "bad unet config":
        (target / "unet" / "config.json").write_text("{ not json")
    elif what == "bad model_index":
        (target / "model_index.json").write_text("\x00\x01garbage")
    return target


# (id, backbone, extra args, exit code, culprits named in the message)
FLAG_CASES = [
    ("unify_steps ,,", "sdxl", ["--unify_steps", ",,"], EXIT_BAD_INPUT, ["--unify_steps is empty"]),
    ("unify_steps 2,2", "sdxl", ["--unify_steps", "2,2"], EXIT_BAD_INPUT, ["--unify_steps 2,2", "distinct"]),
    ("lora_alpha 0", "sdxl", ["--lora_alpha", "0"], EXIT_BAD_INPUT, ["--lora_alpha 0", "> 0"]),
    ("lora_rank 0", "sdxl", ["--lora_rank", "0"], EXIT_BAD_INPUT, ["--lora_rank 0", ">= 1"]),
    ("learning_rate -1", "sdxl", ["--learning_rate", "-1"], EXIT_BAD_INPUT, ["--learning_rate -1.0", "> 0"]),
    ("learning_rate nan", "sdxl", ["--learning_rate", "nan"], EXIT_BAD_INPUT, ["--learning_rate nan"]),
    ("resolution 0", "sdxl", ["--resolution", "0"], EXIT_BAD_INPUT, ["--resolution 0", "positive"]),
    ("resolution -64", "sdxl", ["--resolution", "-64"], EXIT_BAD_INPUT, ["--resolution -64"]),
    ("resolution 60 sdxl", "sdxl", ["--resolution", "60"], EXIT_BAD_INPUT, ["--resolution 60", "multiple of 8"]),
    ("resolution 72 pixart", "pixart", ["--resolution", "72"], EXIT_BAD_INPUT,
     ["--resolution 72", "multiple of 16", "patch size 2"]),
    ("frames 10 cogvideox", "cogvideox", ["--height", "16", "--width", "16", "--frames", "10"], EXIT_BAD_INPUT,
     ["--frames 10", "4k+1", "9 or 13"]),
    ("height 20 cogvideox", "cogvideox", ["--height", "20", "--width", "16", "--frames", "9"], EXIT_BAD_INPUT,
     ["--height 20", "multiple of 16"]),
    ("checkpoints_total_limit 0", "sdxl", ["--checkpoints_total_limit", "0"], EXIT_BAD_INPUT,
     ["--checkpoints_total_limit 0", "delete every checkpoint"]),
    ("adam_beta2 1", "sdxl", ["--adam_beta2", "1"], EXIT_BAD_INPUT, ["--adam_beta2 1.0", "[0, 1)"]),
    ("lr_scheduler", "sdxl", ["--lr_scheduler", "cosinus"], EXIT_BAD_INPUT, ["--lr_scheduler 'cosinus'", "cosine"]),
    ("step_embedding_lr_ratio without unify", "sdxl", ["--step_embedding_lr_ratio", "3"], EXIT_BAD_INPUT,
     ["--step_embedding_lr_ratio", "--unify_steps"]),
    ("target modules", "sdxl", ["--lora_target_modules", "to_q,q_proj"], EXIT_BAD_INPUT,
     ["--lora_target_modules: q_proj", "to_k"]),
    ("backbone pixart on cogvideox", "cogvideox", ["--backbone", "pixart"], EXIT_BAD_INPUT,
     ["--backbone pixart", "CogVideoXPipeline"]),
    ("resume path", "sdxl", ["--resume_from_checkpoint", "checkpoint-7"], EXIT_BAD_INPUT,
     ["--resume_from_checkpoint checkpoint-7", "no checkpoint"]),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags_fail_before_any_model_loads(case, pipelines, prompts, tmp_path):
    _, backbone, extra, code, culprits = case
    before = snapshot(pipelines[backbone], tmp_path)
    result = run("--pretrained_teacher_model", pipelines[backbone], "--prompts", prompts,
                 "--output_dir", tmp_path / "out", *TINY, *extra)
    assert_refused(result, code, *culprits)
    assert snapshot(pipelines[backbone], tmp_path) == before  # not even the output folder was created


FOLDER_CASES = [
    ("truncated unet weights", "truncated", ["diffusion_pytorch_model.safetensors", "corrupt or truncated"]),
    ("random-byte unet weights", "random", ["diffusion_pytorch_model.safetensors", "corrupt or truncated"]),
    ("no scheduler folder", "no scheduler", ["lacks scheduler"]),
    ("unparseable unet config", "bad unet config", ["unet/config.json", "not valid JSON"]),
    ("garbage model_index.json", "bad model_index", ["model_index.json"]),
]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_damaged_teacher_folders_are_named(case, pipelines, prompts, tmp_path):
    _, what, culprits = case
    teacher = damaged_copy(pipelines["sdxl"], tmp_path / "teacher", what)
    before = snapshot(teacher)
    result = run("--pretrained_teacher_model", teacher, "--prompts", prompts, "--output_dir", tmp_path / "out", *TINY)
    assert_refused(result, EXIT_BAD_FILE, *culprits)
    assert snapshot(teacher) == before and not (tmp_path / "out").exists()


CONFIG_CASES = [
    ("bad yaml", "tdm.yaml", "pretrained_teacher_model: [unclosed\n", EXIT_BAD_INPUT, ["tdm.yaml", "not valid YAML"]),
    ("bad json", "tdm.json", '{"max_train_steps": 2,,}', EXIT_BAD_INPUT, ["tdm.json", "not valid JSON"]),
    ("bad toml", "tdm.toml", "max_train_steps = = 2\n", EXIT_BAD_INPUT, ["tdm.toml", "not valid TOML"]),
    ("backbone flux", "tdm.yaml", "backbone: flux\n", EXIT_BAD_INPUT, ["'backbone' in", "'flux'", "sdxl"]),
    ("switch given a string", "tdm.yaml", "gradient_checkpointing: maybe\n", EXIT_BAD_INPUT,
     ["'gradient_checkpointing' in", "true or false"]),
    ("integer given a fraction", "tdm.json", '{"checkpointing_steps": 2.5}', EXIT_BAD_INPUT,
     ["'checkpointing_steps' in", "not an integer"]),
    ("learning_rate 0 in a config", "tdm.toml", "learning_rate = 0\n", EXIT_BAD_INPUT,
     ["'learning_rate' in", "tdm.toml", "> 0"]),
    ("not a table", "tdm.yaml", "- a\n- b\n", EXIT_BAD_INPUT, ["tdm.yaml", "table of flag names"]),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_files_follow_the_flags_rules(case, pipelines, prompts, tmp_path):
    _, name, text, code, culprits = case
    config = tmp_path / name
    config.write_text(text)
    result = run("--config", config, "--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts,
                 "--output_dir", tmp_path / "out", *TINY)
    assert_refused(result, code, *culprits)
    assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file_or_not_writable(pipelines, prompts, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", a_file, *TINY)
    assert_refused(result, EXIT_OUTPUT, f"--output_dir {a_file} is a file")
    assert a_file.read_text() == "mine"
    # sysfs refuses new files even to root: a folder this process cannot write in, on any Linux
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir",
                 "/sys/tdm-out", *TINY)
    assert_refused(result, EXIT_OUTPUT, "--output_dir /sys/tdm-out", "cannot write")


@pytest.fixture(scope="module")
def finished_run(pipelines, prompts, tmp_path_factory):
    """A finished 3-step run (checkpoints 1, 2, 3)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out,
                 *TINY, "--max_train_steps", "3", "--checkpointing_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_a_finished_run_is_never_overwritten_or_mixed(finished_run, pipelines, prompts, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out, *TINY)
    assert_refused(result, EXIT_OUTPUT, f"--output_dir {out} holds a run", "checkpoint-1", "--resume_from_checkpoint",
                   "--overwrite_output_dir")
    assert snapshot(out) == before
    # --overwrite_output_dir: the old run goes as a whole (no stale checkpoint-2/3 beside the new checkpoint-1)
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out, *TINY,
                 "--overwrite_output_dir")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert len(json.loads((out / "train_history.json").read_text())) == 1


def test_resume_refuses_another_lora_rank_naming_what_differs(finished_run, pipelines, prompts, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    before = snapshot(out)
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out,
                 *TINY, "--lora_rank", "8", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_refused(result, EXIT_BAD_FILE, "checkpoint-3 is from another run", "lora_rank 4 there, 8 here")
    assert snapshot(out) == before
    result = run("--pretrained_teacher_model", pipelines["pixart"], "--prompts", prompts, "--output_dir", out,
                 *TINY, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_refused(result, EXIT_BAD_FILE, "backbone sdxl there, pixart here")


def test_resume_latest_skips_a_corrupt_checkpoint_and_keeps_the_history(finished_run, pipelines, prompts, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    student = out / "checkpoint-3" / "student.safetensors"
    student.write_bytes(student.read_bytes()[:100])  # cut short, as by a disk that filled up elsewhere
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out,
                 *TINY, "--max_train_steps", "4", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint-3" in result.stderr and "corrupt or truncated" in result.stderr
    assert "resumed from" in result.stderr and "checkpoint-2 at step 2" in result.stderr
    history = json.loads((out / "train_history.json").read_text())
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]  # steps 1-2 carried over, 3-4 trained again


def test_a_pickle_that_would_run_code_is_refused_without_unsafe_advice(finished_run, pipelines, prompts, tmp_path):
    import torch

    out = _copy_run(finished_run, tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state": Exploit()}, out / "checkpoint-3" / "optimizer_student.pt")
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out,
                 *TINY, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-3")
    assert_refused(result, EXIT_BAD_FILE, "optimizer_student.pt", "not a safe format", "was not executed")
    assert "weights_only" not in result.stderr and "system" in result.stderr  # names the call, not torch's advice
    assert not (tmp_path / "pwned").exists()


def test_disk_full_while_saving_is_one_message_and_the_last_checkpoint_survives(finished_run, pipelines, prompts,
                                                                               tmp_path):
    out = _copy_run(finished_run, tmp_path)
    full = ("import errno, tdm_train.atomic as atomic\n"
            "def full(*args, **kwargs):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device', 'checkpoint-4.tmp/student.safetensors')\n"
            "atomic.save_safetensors = full")
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out, *TINY,
                 "--max_train_steps", "4", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest",
                 python_prefix=full)
    assert_refused(result, EXIT_OUTPUT, "the disk is full", "student.safetensors")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
