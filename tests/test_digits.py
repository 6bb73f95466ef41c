"""The embedded default: the shipped digits teacher and classifier, the metrics, and a short
run of the whole pipeline (the full-length run and its targets are benchmarks/quality_digits.py)."""

import json

import pytest
import torch

import sklearn  # noqa: F401
import peft  # noqa: F401

from tdm_train.demos.digits.classifier import CLASSIFIER_FILE, load_classifier  # noqa: E402
from tdm_train.demos.digits.data import load_digits_tensors  # noqa: E402
from tdm_train.demos.digits.distill import DigitsDemoConfig, load_student, run_digits_demo  # noqa: E402
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


def test_short_run_writes_the_loras_samples_and_metrics(tmp_path):
    cfg = DigitsDemoConfig(iterations=3, unify_iterations=3, batch_size=16, eval_samples=200, teacher_steps=8)
    results = run_digits_demo(cfg, tmp_path, log=lambda line: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == results["rows"]
    methods = [(r["method"], r["steps"], r["nfe"]) for r in metrics["rows"]]
    assert methods == [("teacher-ddim", 8, 16), ("teacher-ddim", 4, 8), ("teacher-dpmsolver++", 4, 8),
                       ("tdm", 4, 4), ("tdm", 2, 2), ("tdm", 1, 1),
                       ("tdm-unify", 4, 4), ("tdm-unify", 2, 2), ("tdm-unify", 1, 1)]
    for row in metrics["rows"]:
        assert set(row) == {"method", "steps", "nfe", "fid", "class_accuracy", "seconds"}
        assert row["fid"] >= 0 and 0 <= row["class_accuracy"] <= 1
    assert (tmp_path / "samples.png").is_file()
    for sub in ("tdm", "tdm_unify"):
        lora = tmp_path / sub / "pytorch_lora_weights.safetensors"
        assert lora.is_file()
        student = load_student(lora)  # the saved student reloads
        x0 = student(torch.randn(2, 1, 8, 8), torch.tensor([899, 899]), torch.tensor([3, 7]))
        assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()


def test_shipped_teacher_makes_the_digits_it_is_asked_for():
    from tdm_train.demos.digits.distill import evaluate

    cfg = DigitsDemoConfig(eval_samples=300, teacher_steps=25)
    rows, _ = evaluate(load_teacher(), {}, cfg)
    teacher = rows[0]
    assert teacher["method"] == "teacher-ddim" and teacher["class_accuracy"] > 0.9
