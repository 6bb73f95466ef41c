"""The embedded default: the shipped digits teacher and classifier, the metrics, and a CI-sized
run of the whole pipeline that must show the headline claims (the full-length run and its table
are `python -m tdm_train` and benchmarks/quality_digits.py)."""

import json

import pytest
import torch

import sklearn  # noqa: F401
import peft  # noqa: F401

from tdm_train.demos.digits.classifier import CLASSIFIER_FILE, load_classifier  # noqa: E402
from tdm_train.demos.digits.data import load_digits_tensors  # noqa: E402
from tdm_train.demos.digits.distill import DigitsDemoConfig, distil_student, load_student, run_digits_demo  # noqa: E402
from tdm_train.demos.digits.metrics import frechet_distance  # noqa: E402
from tdm_train.demos.digits.teacher import TEACHER_FILE, load_teacher  # noqa: E402


def test_shipped_weights_are_small_and_load():
    for path in (TEACHER_FILE, CLASSIFIER_FILE):
        assert path.is_file() and path.stat().st_size < 5 * 2**20
    teacher = load_teacher()
    assert teacher.config.num_class_embeds == 11 and teacher.config.sample_size == 8


def test_classifier_recognises_the_digits():
    images, labels = load_digits_tensors()
    with torch.no_grad():
        accuracy = (load_classifier()(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.98


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, 8, generator=gen), torch.randn(3000, 8, generator=gen)
    assert frechet_distance(a, b) < 0.05
    assert frechet_distance(a, b + 1.0) == pytest.approx(8.0, rel=0.05)  # |mu shift|^2 = 8


def test_digits_quality_reports_the_samples_as_sampled():
    """FID and accuracy see the samples clamped to the data's [-1, 1]; pixel_mean and out_of_range
    describe them as sampled (a 1-step student's pixels reach +-7). The dataset scores FID ~0, its
    own mean and no pixel out of range; with a third of its pixels pushed out to +-3 both statistics
    follow the pushed pixels."""
    from tdm_train.demos.digits.metrics import digits_quality

    images, labels = load_digits_tensors()
    classifier = load_classifier()
    with torch.no_grad():
        reference = classifier.features(images)
    data = digits_quality(images, labels, classifier, reference)
    assert data["fid"] < 1e-6 and data["class_accuracy"] > 0.98
    assert data["pixel_mean"] == pytest.approx(images.mean().item()) and data["out_of_range"] == 0
    pushed = images.clone()
    mask = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) < 1 / 3
    pushed[mask] = torch.where(images[mask] >= 0, 3.0, -3.0)
    quality = digits_quality(pushed, labels, classifier, reference)
    assert quality["pixel_mean"] == pytest.approx(pushed.mean().item())
    assert quality["out_of_range"] == pytest.approx(mask.float().mean().item(), abs=1e-6)
    assert quality["fid"] > 1.0  # clamped, the pushed pixels sit at +-1: not the dataset


def test_the_cli_flags_reach_both_digits_students(tmp_path, capsys):
    """`python -m tdm_train --loss huber_elementwise ...` on the digits demo: TDM's choices, the
    guidance and the generator lr ratio reach the trainer of each student (they were ignored
    before); flags the demo cannot honour (its grids are fixed) are refused before anything runs."""
    from tdm_train.cli import digits_config, main, parse_args

    assert digits_config(parse_args([])) == DigitsDemoConfig()
    flags = ["--loss", "huber_elementwise", "--tau_mode", "tail", "--mid_point", "demo", "--no_importance_weight",
             "--real_guidance_scale", "3", "--generator_lr_ratio", "0.4", "--generator_step_weighting", "output_gain",
             "--iterations", "1", "--batch_size", "4"]
    cfg = digits_config(parse_args(flags))
    trainer = distil_student(load_teacher(), cfg, tmp_path / "tdm", cfg.tdm(), cfg.iterations, progress=False)
    tdm = trainer.config.tdm
    assert (tdm.generator_loss, tdm.tau_mode, tdm.mid_point, tdm.importance_weighting, tdm.guidance_scale,
            tdm.generator_step_weighting) == ("huber_elementwise", "tail", "demo", False, 3.0, "output_gain")
    assert trainer.optimizers["student"].param_groups[0]["lr"] == pytest.approx(cfg.learning_rate * 0.4)
    assert cfg.tdm(unify_steps=(1, 2, 4)).generator_loss == "huber_elementwise"

    for argv, culprit in ((["--num_steps", "2"], "--num_steps"), (["--total_steps", "800"], "--total_steps"),
                          (["--real_guidance_scale", "0.5"], "--real_guidance_scale 0.5"),
                          (["--generator_lr_ratio", "0"], "--generator_lr_ratio 0")):
        out = tmp_path / "never"
        assert main(argv + ["--output_dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and culprit in err and "Traceback" not in err, err
        assert not out.exists()


def test_ci_sized_run_writes_the_students_and_shows_the_headline_claims(tmp_path):
    """Both students through the trainer (40 iterations each, batch 32), saved, reloaded from their
    files and measured on 400 samples (~45 CPU-seconds): the 4-step student beats the teacher's
    own 4-step DDIM (CFG, 8 evaluations) by a clear margin with 4 evaluations, and the
    sampling-steps-aware student, told K, is far better at 1 step than the fixed 4-step student.
    Measured at this size (3 runs): 4 steps FID 23.1-23.7 vs DDIM 28.4; unify 1 step 69.8-71.9 vs
    fixed 1 step 205.8-254.7, and 325.4 for the same unify LoRA sampled without its c_1; unify 4
    steps 15.4-17.5."""
    cfg = DigitsDemoConfig(iterations=40, unify_iterations=40, batch_size=32, learning_rate=3e-3, eval_samples=400,
                           teacher_steps=8)
    results = run_digits_demo(cfg, tmp_path, log=lambda line: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == results["rows"]
    methods = [(r["method"], r["steps"], r["nfe"]) for r in metrics["rows"]]
    assert methods == [("teacher-ddim", 8, 16), ("teacher-ddim", 4, 8), ("teacher-dpmsolver++", 4, 8),
                       ("tdm", 4, 4), ("tdm", 2, 2), ("tdm", 1, 1),
                       ("tdm-unify", 4, 4), ("tdm-unify", 2, 2), ("tdm-unify", 1, 1)]
    for row in metrics["rows"]:
        assert set(row) == {"method", "steps", "nfe", "fid", "class_accuracy", "pixel_mean", "out_of_range", "seconds"}
        assert row["fid"] >= 0 and 0 <= row["class_accuracy"] <= 1 and 0 <= row["out_of_range"] <= 1
    fid = {(r["method"], r["steps"]): r["fid"] for r in metrics["rows"]}
    assert fid[("tdm", 4)] < 0.9 * fid[("teacher-ddim", 4)], fid  # half the evaluations, clearly better
    assert fid[("tdm-unify", 4)] < 0.8 * fid[("teacher-ddim", 4)], fid
    assert fid[("tdm-unify", 1)] < 0.5 * fid[("tdm", 1)], fid  # trained for 1 step and told so
    assert (tmp_path / "samples.png").is_file()
    for sub in ("tdm", "tdm_unify"):
        lora = tmp_path / sub / "pytorch_lora_weights.safetensors"
        assert lora.is_file()
        student = load_student(lora)  # the saved student reloads
        x0 = student(torch.randn(2, 1, 8, 8), torch.tensor([899, 899]), torch.tensor([3, 7]))
        assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()
    assert load_student(tmp_path / "tdm" / "pytorch_lora_weights.safetensors").conditions is None
    unify = load_student(tmp_path / "tdm_unify" / "pytorch_lora_weights.safetensors")
    assert unify.conditions.steps == [1, 2, 4]
    # the K condition is what makes it the 1-step student: without its c_1 the same LoRA is far worse
    from tdm_train.demos.digits.distill import DigitsStudent, evaluate

    rows, _ = evaluate(load_teacher(), {"told": unify, "not told": DigitsStudent(unify.backend.model, None)}, cfg,
                       student_steps=(1,), teacher_rows=False)
    told, not_told = (r["fid"] for r in rows)
    assert told == pytest.approx(fid[("tdm-unify", 1)])
    assert told < 0.8 * not_told, (told, not_told)
    # rows off the uniform grid (benchmarks/quality_digits.py --two_step_grids): a plan of the trained
    # grid and K is that row; the plan's K picks the condition, whatever the number of timesteps
    from tdm_train.demos.digits.distill import Sampling

    rows, _ = evaluate(load_teacher(), {"told": unify}, cfg, student_steps=(Sampling((899,)), Sampling((899,), 4)),
                       teacher_rows=False)
    assert [(r["steps"], r["grid"], r["condition"]) for r in rows] == [(1, [899], 1), (1, [899], 4)]
    assert rows[0]["fid"] == pytest.approx(told)
    assert abs(rows[1]["fid"] - told) > 1.0, rows  # c_4 applied, not c_1


def test_shipped_teacher_makes_the_digits_it_is_asked_for():
    from tdm_train.demos.digits.distill import evaluate

    cfg = DigitsDemoConfig(eval_samples=300, teacher_steps=25)
    rows, _ = evaluate(load_teacher(), {}, cfg)
    teacher = rows[0]
    assert teacher["method"] == "teacher-ddim" and teacher["class_accuracy"] > 0.9
