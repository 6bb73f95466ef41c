"""benchmarks/unify_curve.py's snapshots: every saved file is the student at that iteration (its
weights as trained, or their EMA), and taking the snapshots leaves the training run unchanged."""

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file

from tdm_train.demos.digits.distill import DigitsDemoConfig, distil_student
from tdm_train.demos.digits.teacher import load_teacher
from tdm_train.lora.export import DIFFUSERS_FILE

ROOT = Path(__file__).resolve().parents[1]


def _curve_module():
    spec = importlib.util.spec_from_file_location("unify_curve", ROOT / "benchmarks" / "unify_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_snapshots_are_the_raw_and_ema_students_and_leave_training_alone(tmp_path):
    curve = _curve_module()
    teacher = load_teacher()
    cfg = DigitsDemoConfig(batch_size=8, step_embedding_lr_ratio=3.0)
    tdm = cfg.tdm(unify_steps=(1, 2, 4))
    decay = 0.6
    snapshots = curve.Snapshots(tmp_path / "snap", every=1, decays=[decay])
    distil_student(teacher, cfg, tmp_path / "with", tdm, 4, progress=False, on_step=snapshots)
    distil_student(teacher, cfg, tmp_path / "without", tdm, 4, progress=False)

    # the run with snapshots ends where the run without them does (the EMA swaps were undone)
    final = load_file(str(tmp_path / "with" / DIFFUSERS_FILE))
    assert final.keys() == load_file(str(tmp_path / "without" / DIFFUSERS_FILE)).keys()
    for key, value in load_file(str(tmp_path / "without" / DIFFUSERS_FILE)).items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)

    # raw at step 4 is the final student; the EMA file is the EMA of the raw files, key by key,
    # LoRA and K condition alike (c_K is linear in the K embedding's weights)
    raw = [load_file(str(tmp_path / "snap" / str(step) / "raw" / DIFFUSERS_FILE)) for step in range(1, 5)]
    ema = load_file(str(tmp_path / "snap" / "4" / f"ema{decay:g}" / DIFFUSERS_FILE))
    assert [(s, w) for s, w, _ in snapshots.saved] == [(s, w) for s in range(1, 5) for w in ("raw", f"ema{decay:g}")]
    assert any(k.startswith("tdm_step_embedding") for k in ema)
    changed = 0
    for key in final:
        torch.testing.assert_close(raw[3][key], final[key], rtol=0, atol=0)
        expected = raw[0][key].clone()
        for later in raw[1:]:
            expected = decay * expected + (1 - decay) * later[key]
        torch.testing.assert_close(ema[key], expected, rtol=1e-5, atol=1e-7)
        changed += not torch.equal(ema[key], final[key])
    assert changed > len(final) // 2  # the EMA is not the raw student


def test_trainer_ema_snapshots_are_the_trainers_average_of_the_raw_files(tmp_path):
    """--trainer_ema: the unify student trains with use_ema; each snapshot holds its trained weights
    (raw) and the trainer's EMA, which is EMAModel's ramp over the raw files; the final file is that EMA."""
    curve = _curve_module()
    teacher = load_teacher()
    cfg = DigitsDemoConfig(batch_size=8, step_embedding_lr_ratio=3.0)
    snapshots = curve.Snapshots(tmp_path / "snap", every=1, decays=[])
    distil_student(teacher, cfg, tmp_path / "final", cfg.tdm(unify_steps=(1, 2, 4)), 4, progress=False,
                   on_step=snapshots, ema_decay=0.6)
    assert [(s, w) for s, w, _ in snapshots.saved] == [(s, w) for s in range(1, 5) for w in ("raw", "trainer-ema")]
    raw = [load_file(str(tmp_path / "snap" / str(step) / "raw" / DIFFUSERS_FILE)) for step in range(1, 5)]
    ema = load_file(str(tmp_path / "snap" / "4" / "trainer-ema" / DIFFUSERS_FILE))
    final = load_file(str(tmp_path / "final" / DIFFUSERS_FILE))
    changed = 0
    for key in ema:
        expected = raw[0][key].clone()
        for n, later in enumerate(raw[1:], start=2):
            d = min(0.6, n / (9 + n))  # diffusers EMAModel without warmup: 0 at the first update
            expected = d * expected + (1 - d) * later[key]
        torch.testing.assert_close(ema[key], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(final[key], ema[key], rtol=0, atol=0)
        changed += not torch.equal(ema[key], raw[3][key])
    assert changed > len(ema) // 2


def test_pearson_is_the_correlation_coefficient():
    """The 1-step FID / pixel-mean correlation the benchmark prints: torch.corrcoef's value, the sign
    kept (brighter and worse is positive)."""
    pearson = _curve_module().pearson
    fid, mean = [102.0, 43.7, 142.7, 63.2, 238.4], [-0.237, -0.462, -0.217, -0.408, -0.115]
    expected = torch.corrcoef(torch.tensor([fid, mean], dtype=torch.float64))[0, 1].item()
    assert abs(pearson(fid, mean) - expected) < 1e-12
    assert expected > 0.9
    assert abs(pearson(fid, [-m for m in mean]) + expected) < 1e-12
