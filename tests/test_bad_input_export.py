"""`python -m export.trt` on bad input: a good export is never replaced by a failed one, nothing
non-finite leaves the tool (NaN LoRAs refused, failed exports not used without --force, NaN output
never written), and damaged files are named with exit code 3. Each case asserts its exit code
(tdm_train/errors.py), the culprit in the message, no traceback, and nothing on disk changed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import onnxruntime  # noqa: F401
import onnx_graphsurgeon  # noqa: F401

from disk_state import snapshot  # noqa: E402
from export_helpers import SIZES, tiny_student  # noqa: E402
from export.trt import (EXIT_BAD_FILE, EXIT_NONFINITE, EXIT_OUTPUT, EXIT_TOLERANCE,  # noqa: E402
                        main)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(pipeline, LoRA file, a good fp32 export)."""
    root = tmp_path_factory.mktemp("export")
    pipeline, lora = tiny_student(root, "sdxl")
    lora_file = lora / "pytorch_lora_weights.safetensors"
    out = root / "good"
    assert main(["onnx", "--model", str(pipeline), "--lora", str(lora_file), "--out-dir", str(out),
                 "--dtype", "fp32", *SIZES]) == 0
    return pipeline, lora_file, out


@pytest.fixture(scope="module")
def overflowing(exported, tmp_path_factory):
    """An fp16 export whose fused weights overflow fp16 (LoRA strength 1e6): it fails validation
    and engine.json says so, as a diverged student's export would."""
    pipeline, lora_file, _ = exported
    out = tmp_path_factory.mktemp("overflow") / "export"
    code = main(["onnx", "--model", str(pipeline), "--lora", str(lora_file), "--lora-strength", "1e6",
                 "--out-dir", str(out), "--dtype", "fp16", *SIZES])
    assert code == EXIT_TOLERANCE
    assert json.loads((out / "engine.json").read_text())["validation"]["passed"] is False
    return out


def refused(capsys, code, expected, *culprits):
    captured = capsys.readouterr()
    assert code == expected, (code, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    for culprit in culprits:
        assert culprit in captured.err, (culprit, captured.err[-2000:])


def test_an_export_is_not_replaced_without_force(exported, tmp_path, capsys):
    pipeline, lora_file, good = exported
    out = tmp_path / "export"
    shutil.copytree(good, out)
    before = snapshot(out)
    code = main(["onnx", "--model", str(pipeline), "--lora", str(lora_file), "--out-dir", str(out), *SIZES])
    refused(capsys, code, EXIT_OUTPUT, f"--out-dir {out} holds an export", "--force")
    assert snapshot(out) == before


def test_a_failed_replacement_never_replaces_the_good_export(exported, tmp_path, capsys):
    pipeline, lora_file, good = exported
    out = tmp_path / "export"
    shutil.copytree(good, out)
    before = snapshot(out)
    code = main(["onnx", "--model", str(pipeline), "--lora", str(lora_file), "--lora-strength", "1e6",
                 "--out-dir", str(out), "--dtype", "fp16", "--force", *SIZES])
    refused(capsys, code, EXIT_TOLERANCE, "out of tolerance", f"previous export in {out} is unchanged",
            "export.failed")
    assert snapshot(out) == before
    assert json.loads((tmp_path / "export.failed" / "engine.json").read_text())["validation"]["passed"] is False
    # a replacement that validates is swapped in whole, leaving no side folder
    assert main(["onnx", "--model", str(pipeline), "--lora", str(lora_file), "--out-dir", str(out), "--dtype", "fp16",
                 "--force", *SIZES]) == 0
    assert json.loads((out / "engine.json").read_text())["dtype"] == "fp16"
    assert not (tmp_path / "export.partial").exists() and not (tmp_path / "export.previous").exists()


def test_a_lora_holding_nan_is_never_fused(exported, tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    pipeline, lora_file, _ = exported
    with safe_open(str(lora_file), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    poisoned_key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[poisoned_key] = torch.full_like(tensors[poisoned_key], float("nan"))
    bad = tmp_path / "nan_lora.safetensors"
    save_file(tensors, str(bad), metadata)
    code = main(["onnx", "--model", str(pipeline), "--lora", str(bad), "--out-dir", str(tmp_path / "out"), *SIZES])
    refused(capsys, code, EXIT_NONFINITE, "NaN or inf", poisoned_key)
    assert not (tmp_path / "out").exists()


def test_a_failed_export_is_not_used_without_force_and_nan_output_is_never_written(exported, overflowing, tmp_path,
                                                                                  capsys):
    pipeline, _, _ = exported
    image = tmp_path / "x.png"
    for command in (["generate", str(overflowing), "--prompt", "a cat", "--out", str(image), "--model", str(pipeline),
                     "--provider", "cpu"], ["bench", str(overflowing), "--repeats", "1"]):
        code = main(command)
        refused(capsys, code, EXIT_TOLERANCE, "failed its validation", "--force")
    assert not image.exists()
    code = main(["generate", str(overflowing), "--prompt", "a cat", "--out", str(image), "--model", str(pipeline),
                 "--provider", "cpu", "--force"])
    refused(capsys, code, EXIT_NONFINITE, "non-finite", "nothing was written")
    assert not image.exists()


def _damaged_export(good: Path, target: Path, what: str) -> Path:
    shutil.copytree(good, target)
    manifest = json.loads((target / "engine.json").read_text())
    if what == "garbage onnx":
        (target / "model.opt.onnx").write_bytes(os.urandom(2048))
    elif what == "fields missing":
        for key in ("timesteps", "inputs"):
            manifest.pop(key)
        (target / "engine.json").write_text(json.dumps(manifest))
    elif what == "not json":
        (target / "engine.json").write_text("{ cut short")
    return target


@pytest.mark.parametrize("what, commands, culprits", [
    ("garbage onnx", ("validate", "inspect", "generate"), ["model.opt.onnx", "not an ONNX model"]),
    ("fields missing", ("validate", "inspect", "generate", "bench"), ["engine.json lacks", "timesteps", "inputs"]),
    ("not json", ("validate", "inspect", "generate", "bench"), ["engine.json is not valid JSON"]),
])
def test_damaged_exports_are_named(exported, tmp_path, capsys, what, commands, culprits):
    pipeline, _, good = exported
    target = _damaged_export(good, tmp_path / "damaged", what)
    before = snapshot(target)
    for command in commands:
        extra = {"validate": ["--provider", "cpu"], "inspect": [], "bench": ["--repeats", "1"],
                 "generate": ["--prompt", "a cat", "--out", str(tmp_path / "x.png"), "--model", str(pipeline),
                              "--provider", "cpu"]}[command]
        code = main([command, str(target), *extra])
        refused(capsys, code, EXIT_BAD_FILE, *culprits)
    assert snapshot(target) == before and not (tmp_path / "x.png").exists()


def test_out_dir_that_is_a_file_and_the_module_entry_point_prints_no_traceback(exported, tmp_path):
    pipeline, lora_file, good = exported
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    done = subprocess.run([sys.executable, "-m", "export.trt", "onnx", "--model", str(pipeline), "--out-dir",
                           str(a_file)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_OUTPUT and f"--out-dir {a_file} is a file" in done.stderr
    assert "Traceback" not in done.stderr and a_file.read_text() == "mine"
    garbage = _damaged_export(good, tmp_path / "garbage", "garbage onnx")
    done = subprocess.run([sys.executable, "-m", "export.trt", "validate", str(garbage), "--provider", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_BAD_FILE and "not an ONNX model" in done.stderr and "Traceback" not in done.stderr
