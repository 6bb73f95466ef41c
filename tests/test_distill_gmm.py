"""End to end: TDM distils a 4-step MLP student from the exact teacher of an 8-mode 2-D mixture.

Why these bounds. On this mixture the teacher's own 4-step DDIM (899/674/449/224, from pure
noise) smears the modes into a ring: energy distance to the data ~0.036 at 4000 samples, against
a noise floor (two independent data draws) of ~0.001. TDM_SPEC's known-good result is that the
student beats half of the teacher's 4-step distance with every mode holding >= 5% of the
samples (equal weights would give 12.5%); we measured 0.0019 (ratio 0.05), so the bound of 0.5
leaves a 10x margin for seeds and BLAS differences, while a student that did not learn (the
pre-fit network at 4 steps: ratio ~1.0) or that collapsed modes fails it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdm_train.demos.gaussian_mixture import GaussianMixture
from tdm_train.demos.gmm_distill import GMMDemoConfig, run_gmm_demo
from tdm_train.demos.metrics import energy_distance
from tdm_train.distill import TDMConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tdm_student_covers_every_mode_and_beats_the_teachers_4_step_sampler():
    results = run_gmm_demo(GMMDemoConfig(seed=0), log=lambda line: None)
    rows = results["rows"]
    before = rows["pre-fit network, 4-step (before TDM)"]
    student = rows["TDM student, 4-step"]
    teacher4 = rows["teacher, exact, 4-step DDIM"]
    assert before["energy_distance"] > 0.8 * teacher4["energy_distance"]  # pre-fit = teacher at 4 steps
    assert student["min_mode_fraction"] >= 0.05
    assert student["energy_distance"] < 0.5 * teacher4["energy_distance"]
    assert student["energy_distance"] < 0.5 * before["energy_distance"]  # TDM did it, not the pre-fit
    assert results["timesteps"] == [899, 674, 449, 224]


@pytest.mark.slow
def test_on_rectified_flow_the_student_beats_the_exact_teachers_4_step_euler_by_4x():
    """The same method on a flow schedule (shift 3, SD3's): issue target ED <= 0.25x the exact
    teacher's 4-step Euler with every mode >= 5%. Measured 0.026x (student ED 0.0034 vs 0.128,
    smallest mode 9.5%), so the 0.25 bound has a 10x margin; the pre-fit network at 4 steps (ratio
    ~1.0) or a collapsed student fails it."""
    results = run_gmm_demo(GMMDemoConfig(seed=0, schedule="flow", tdm=TDMConfig(total_steps=1000)),
                           log=lambda line: None)
    rows = results["rows"]
    student, teacher4 = rows["TDM student, 4-step"], rows["teacher, exact, 4-step Euler"]
    before = rows["pre-fit network, 4-step (before TDM)"]
    assert results["timesteps"] == [999, 749, 499, 249] and results["teacher_solver"] == "Euler"
    assert before["energy_distance"] > 0.8 * teacher4["energy_distance"]
    assert student["min_mode_fraction"] >= 0.05
    assert student["energy_distance"] <= 0.25 * teacher4["energy_distance"]
    # the exact teacher is near-perfect with enough Euler steps: the gap is the few-step sampler's
    assert rows["teacher, exact, 100-step Euler"]["energy_distance"] < 0.01


@pytest.mark.parametrize("schedule", ["ddpm", "flow"])
def test_gaussian_mixture_teacher_is_the_posterior_mean(schedule):
    """Monte Carlo check of the closed form: E[x0 | x_t] = sum_i w_i x0_i / sum_i w_i over prior
    draws x0_i weighted by the likelihood N(x_t; alpha x0_i, sigma^2 I) (Bayes, self-normalised)."""
    from tdm_train import NoiseSchedule

    if schedule == "flow":  # x_t = (1 - sigma) x0 + sigma eps with SD3's shift
        schedule = NoiseSchedule.flow_matching(shift=3.0)
    else:
        schedule = NoiseSchedule.from_diffusers_config(
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        )
    gmm = GaussianMixture.ring(radius=1.5, std=0.3)
    x0 = gmm.sample(400000, torch.Generator().manual_seed(0)).double()
    point = torch.tensor([[0.6, 0.2]], dtype=torch.float64)
    for level in (99, 249, 449, 749):
        t = torch.tensor([level])
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        log_w = -((point - alpha * x0) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(log_w, 0)
        assert 1 / (w**2).sum() > 2000  # effective sample size
        empirical = (w[:, None] * x0).sum(0)
        exact = gmm.x0_posterior_mean(point, t, schedule)[0]
        torch.testing.assert_close(empirical, exact, atol=0.02, rtol=0)


def test_energy_distance_separates_distributions():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 2, generator=gen), torch.randn(1500, 2, generator=gen)
    shifted = torch.randn(1500, 2, generator=gen) + torch.tensor([0.5, 0.0])
    assert energy_distance(a, b) < 0.01
    assert energy_distance(a, shifted) > 0.1


def test_mode_fractions():
    gmm = GaussianMixture.ring(num_modes=4, radius=2.0, std=0.1)
    points = torch.cat([gmm.means[:1].float().repeat(3, 1), gmm.means[2:3].float(), torch.zeros(1, 2)])
    fractions, inside = gmm.mode_fractions(points)
    assert fractions.tolist() == pytest.approx([0.6, 0.0, 0.2, 0.0])
    assert inside == pytest.approx(0.8)  # the origin is 20 std from every mode


def test_cli_writes_plot_metrics_and_student(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "tdm_train", "--demo", "gmm", "--output-dir", str(out), "--prefit-iterations", "50",
         "--iterations", "5", "--batch-size", "64", "--eval-samples", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "| TDM student, 4-step |" in run.stdout
    from PIL import Image
    from safetensors.torch import load_file

    with Image.open(out / "samples.png") as image:
        assert image.size[0] > 3 * image.size[1] / 2  # three panels side by side
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timesteps"] == [899, 674, 449, 224] and metrics["config"]["iterations"] == 5
    weights = load_file(str(out / "student.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not list(out.glob("*.tmp"))


def test_cli_flow_schedule_starts_the_grid_at_pure_noise(tmp_path):
    out = tmp_path / "flow"
    run = subprocess.run(
        [sys.executable, "-m", "tdm_train", "--demo", "gmm", "--schedule", "flow", "--output-dir", str(out),
         "--prefit-iterations", "50", "--iterations", "5", "--batch-size", "64", "--eval-samples", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "rectified flow, shift 3" in run.stdout and "| teacher, exact, 4-step Euler |" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timesteps"] == [999, 749, 499, 249] and metrics["config"]["schedule"] == "flow"
    bad = subprocess.run([sys.executable, "-m", "tdm_train", "--demo", "gmm", "--schedule", "flow", "--flow_shift",
                          "-1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--flow_shift -1" in bad.stderr


def test_cli_rejects_bad_arguments():
    run = subprocess.run([sys.executable, "-m", "tdm_train", "--tau-mode", "everywhere"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "tau-mode" in run.stderr
    # the toy's MLPs are EDM-preconditioned x0 networks: no prediction type for the output-gain weighting
    run = subprocess.run([sys.executable, "-m", "tdm_train", "--demo", "gmm", "--generator_step_weighting",
                          "output_gain"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "--generator_step_weighting" in run.stderr and "Traceback" not in run.stderr
