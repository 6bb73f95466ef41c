"""`python -m tdm_train` on tiny pipeline folders: detection, prompt files, config files with flag
overrides, outputs, resume, validation images, and bad input refused before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import peft  # noqa: F401
import transformers  # noqa: F401

from tdm_train.cli import parse_args  # noqa: E402
from tdm_train.errors import EXIT_BAD_FILE  # noqa: E402
from tdm_train.training.prompts import read_prompts  # noqa: E402
from tdm_train.tiny_models import save_tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    return {bb: save_tiny_pipeline(base / bb, bb) for bb in ("sdxl", "pixart", "cogvideox")}


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a cat\n\na red horse on the moon\nan astronaut riding a horse\n")
    return path


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tdm_train", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_sdxl_run_from_a_config_file_with_flag_overrides_then_resume(pipelines, prompts, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "tdm.toml"
    config.write_text(f'pretrained_teacher_model = "{pipelines["sdxl"]}"\nprompts = "{prompts}"\n'
                      f'output_dir = "{out}"\nmax_train_steps = 99\nlora_rank = 4\nlora_alpha = 2\n'
                      'resolution = 64\ncheckpointing_steps = 1\nreal_guidance_scale = 2.0\n')
    first = run("--config", config, "--max_train_steps", "2", "--validation_steps", "2",
                "--validation_teacher_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "TDM sdxl: 2 steps, 0 skipped" in first.stdout  # the flag beat the file's 99
    for name in ("pytorch_lora_weights.safetensors", "tdm_lora_comfyui.safetensors", "README.md",
                 "checkpoint-1", "checkpoint-2", "validation/step-000002.png"):
        assert (out / name).exists(), name
    assert len(list((out / "cache").glob("prompt_cache_*.safetensors"))) == 1
    second = run("--config", config, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "TDM sdxl: 3 steps" in second.stdout and (out / "checkpoint-3").is_dir()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["config"]["lora_alpha"] == 2.0 and state["config"]["tdm"]["guidance_scale"] == 2.0
    # a run without EMA cannot be continued as one with it (nor the reverse): refused before models load
    third = run("--config", config, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--use_ema")
    assert third.returncode == EXIT_BAD_FILE and "no EMA there, --use_ema here" in third.stderr, third.stderr[-2000:]
    assert "Traceback" not in third.stderr and not (out / "checkpoint-4").exists()


@pytest.mark.parametrize("backbone, extra, guidance", [
    ("pixart", ["--resolution", "64"], 4.5),  # no flag: PixArt-alpha's default, the official demo's 4.5
    ("cogvideox", ["--height", "16", "--width", "16", "--frames", "9", "--student_timesteps", "999,856,665,399",
                   "--real_guidance_scale", "1"], 1.0),  # an explicit 1 beats the default (6)
])
def test_pixart_and_cogvideox_runs(pipelines, prompts, tmp_path, backbone, extra, guidance):
    from safetensors import safe_open

    out = tmp_path / backbone
    result = run("--pretrained_teacher_model", pipelines[backbone], "--prompts", prompts, "--output_dir", out,
                 "--max_train_steps", "1", "--lora_rank", "4", "--lora_alpha", "4", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"TDM {backbone}: 1 steps" in result.stdout
    assert (out / "tdm_lora_comfyui.safetensors").is_file()
    # the guidance trained with, in the LoRA metadata, the model card and the checkpoint
    for name in ("tdm_lora_comfyui.safetensors", "pytorch_lora_weights.safetensors"):
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata()["tdm.training_cfg"] == f"{guidance:g}", name
    assert f"Teacher guidance (CFG) distilled into it: {guidance:g} (" in (out / "README.md").read_text()
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["config"]["tdm"]["guidance_scale"] == guidance


@pytest.mark.parametrize("args, message", [
    (["--student_timesteps", "1200,500"], "outside"),
    (["--student_timesteps", "899,674,449,224", "--num_steps", "2"], "does not match"),
    (["--mixed_precision", "fp8"], "invalid choice"),
    (["--max_train_steps", "0"], "max_train_steps"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: an integer >= 1"),
    (["--mid_point", "demo", "--student_timesteps", "999,856,665,399"], "needs a uniform grid"),
])
def test_bad_settings_fail_before_models_load(pipelines, prompts, tmp_path, args, message):
    # a tiny, 1-step run after the flag under test: a check that regresses fails fast instead of training on
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir",
                 tmp_path / "never", "--resolution", "64", "--max_train_steps", "1", *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "never" / "cache").exists()  # nothing was encoded


def test_wrong_model_type_and_missing_inputs(tmp_path, prompts, pipelines):
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    result = run("--pretrained_teacher_model", other, "--prompts", prompts)
    assert result.returncode == 3 and "FluxPipeline" in result.stderr and "StableDiffusionXLPipeline" in result.stderr
    result = run("--pretrained_teacher_model", tmp_path / "nowhere", "--prompts", prompts)
    assert result.returncode == 2 and "no such folder" in result.stderr
    result = run("--pretrained_teacher_model", pipelines["sdxl"])
    assert result.returncode == 2 and "--prompts is required" in result.stderr
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("pretrained_teacher_model: x\nlearning_rte: 1\n")
    result = run("--config", bad_config)
    assert result.returncode == 2 and "learning_rte" in result.stderr


def test_prompt_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a cat"}\n\n{"text": "a dog", "id": 2}\n')
    (tmp_path / "b.csv").write_text("id,caption\n1,a horse\n2,the moon\n")
    (tmp_path / "c.csv").write_text("id,words\n1,a horse\n")
    assert read_prompts(tmp_path / "a.jsonl") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "b.csv") == ["a horse", "the moon"]
    assert read_prompts(tmp_path / "c.csv", column="words") == ["a horse"]
    with pytest.raises(ValueError, match="prompt_column"):
        read_prompts(tmp_path / "c.csv")
    (tmp_path / "d.md").write_text("x")
    with pytest.raises(ValueError, match=".txt, .jsonl or .csv"):
        read_prompts(tmp_path / "d.md")


def test_yaml_config_values_and_help_lists_every_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pretrained_teacher_model: /x\nlora_target_modules: to_q,to_v\nstudent_timesteps: 999,500\n")
    args = parse_args(["--config", str(config), "--seed", "7"])
    assert args.lora_target_modules == ["to_q", "to_v"] and args.student_timesteps == [999, 500] and args.seed == 7
    help_text = run("--help").stdout
    for flag in ("--pretrained_teacher_model", "--output_dir", "--train_batch_size", "--max_train_steps",
                 "--learning_rate", "--mixed_precision", "--gradient_checkpointing", "--lora_rank", "--lora_alpha",
                 "--lora_target_modules", "--resolution", "--frames", "--checkpointing_steps",
                 "--checkpoints_total_limit", "--resume_from_checkpoint", "--validation_steps", "--report_to",
                 "--seed", "--student_timesteps", "--num_steps", "--total_steps", "--real_guidance_scale",
                 "--tau_mode", "--loss", "--fake_updates_per_generator", "--config", "--backbone",
                 "--gradient_accumulation_steps", "--ddp_bucket_cap_mb", "--generator_step_weighting"):
        assert flag in help_text, flag


def test_tensorboard_gets_losses_and_validation_images(pipelines, prompts, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    result = run("--pretrained_teacher_model", pipelines["sdxl"], "--prompts", prompts, "--output_dir", out,
                 "--max_train_steps", "2", "--lora_rank", "4", "--lora_alpha", "4", "--resolution", "64",
                 "--validation_steps", "2", "--validation_teacher_steps", "3", "--real_guidance_scale", "2",
                 "--report_to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tdm"))
    events.Reload()
    assert {"fake_loss", "generator_loss", "generator_grad_norm", "normalizer_mean",
            "importance_weight_mean"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["validation/student_top_teacher_bottom"]
    assert len(events.Scalars("generator_loss")) == 2


def test_accumulation_precision_bucket_and_ema_flags_reach_the_training_config(pipelines, prompts):
    from tdm_train.training.run import check_args

    args = parse_args(["--pretrained_teacher_model", str(pipelines["sdxl"]), "--prompts", str(prompts),
                       "--gradient_accumulation_steps", "4", "--mixed_precision", "fp16", "--ddp_bucket_cap_mb", "50",
                       "--use_ema", "--ema_decay", "0.99", "--generator_step_weighting", "output_gain",
                       "--output_dir", str(prompts.parent / "never")])
    _, _, config = check_args(args)
    assert (config.gradient_accumulation_steps, config.mixed_precision, config.ddp_bucket_cap_mb) == (4, "fp16", 50.0)
    assert (config.use_ema, config.ema_decay) == (True, 0.99)
    assert config.tdm.generator_step_weighting == "output_gain"
    _, _, defaults = check_args(parse_args(["--pretrained_teacher_model", str(pipelines["sdxl"]),
                                            "--prompts", str(prompts), "--output_dir", str(prompts.parent / "never")]))
    assert (defaults.gradient_accumulation_steps, defaults.ddp_bucket_cap_mb) == (1, 25.0)
    assert (defaults.use_ema, defaults.ema_decay) == (False, 0.9999)  # off, as in the demo; EMAModel's decay
    assert defaults.tdm.generator_step_weighting == "none"  # the paper's and the demo's


def _lora(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_every_random_draw_follows_the_seed(pipelines, prompts, tmp_path):
    """The same command twice writes the same LoRA, bit for bit, and a run stopped at step 2 then
    resumed to step 3 writes the LoRA of the straight 3-step run. The denoiser has dropout (0.1 in
    its resnets), so the global RNG is drawn from inside the loop too, not only the LoRA's
    initialisation and the trainer's own generator."""
    import shutil

    teacher = tmp_path / "sdxl_dropout"
    shutil.copytree(pipelines["sdxl"], teacher)
    config_path = teacher / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "dropout": 0.1}))
    out = tmp_path / "out"
    args = ["--pretrained_teacher_model", teacher, "--prompts", prompts, "--output_dir", out, "--lora_rank", "4",
            "--lora_alpha", "4", "--resolution", "64", "--real_guidance_scale", "2", "--seed", "3"]
    results = {}
    for name, extra in (("first", ["--max_train_steps", "3"]), ("second", ["--max_train_steps", "3"]),
                        ("stopped", ["--max_train_steps", "2"]),
                        ("resumed", ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])):
        result = run(*args, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = _lora(out)
        if name in ("first", "second"):  # the next command starts from nothing again (no cache, no checkpoint)
            shutil.rmtree(out)
    assert "resumed from" in result.stderr + result.stdout
    first = results["first"]
    assert first and all(v.abs().max() > 0 for k, v in first.items() if "lora_B" in k or "lora_up" in k)
    for name in ("second", "resumed"):
        assert results[name].keys() == first.keys()
        diff = {k: float((results[name][k] - first[k]).abs().max()) for k in first}
        worst = max(diff.values())
        assert worst == 0.0, f"{name}: {sum(d > 0 for d in diff.values())} tensors differ, max {worst}"
    assert any(not (results["stopped"][k] == first[k]).all() for k in first)  # step 3 did change the LoRA
