"""The TDM objective, piece by piece, against its formulas (TDM_SPEC "One training iteration")."""

import math

import pytest
import torch
from conftest import PIXART_SCHEDULER, SDXL_SCHEDULER

from tdm_train import (
    NoiseSchedule,
    TDMConfig,
    TDMObjective,
    cfg_x0,
    diffuse,
    effective_noise,
    fake_score_loss,
    generator_loss,
    generator_normalizer,
    generator_step_weight,
    generator_target,
    importance_weight,
    mid_timesteps,
    min_snr_weight,
    pseudo_huber_constant,
    sample_tau,
    transition_coefficients,
)

GRID = [899, 674, 449, 224]


@pytest.fixture
def schedule():
    return NoiseSchedule.from_diffusers_config(PIXART_SCHEDULER)


def test_mid_points_grid_and_demo():
    steps = torch.tensor([0, 1, 2, 3])
    assert mid_timesteps(steps, GRID).tolist() == [674, 449, 224, 0]
    assert mid_timesteps(steps, GRID, "demo", total_steps=900).tolist() == [675, 450, 225, 0]
    with pytest.raises(ValueError, match="total_steps"):
        mid_timesteps(steps, GRID, "demo")


def test_tau_intervals_separate_and_tail():
    n = 20000
    gen = torch.Generator().manual_seed(0)
    for t, s, low, high in [(224, 0, 20, 214), (449, 224, 224, 439), (674, 449, 449, 664), (899, 674, 674, 889)]:
        tau = sample_tau(torch.full((n,), t), torch.full((n,), s), 900, "separate", generator=gen)
        assert tau.dtype == torch.long
        assert tau.min().item() == low and tau.max().item() == high - 1  # [max(20, s), t - 10)
        tail = sample_tau(torch.full((n,), t), torch.full((n,), s), 900, "tail", generator=gen)
        assert tail.min().item() == low and tail.max().item() == 889  # [max(20, s), T_s - 10)
    # uniform: each integer of [20, 214) about equally often
    tau = sample_tau(torch.full((n,), 224), torch.zeros(n, dtype=torch.long), 900, generator=gen)
    counts = torch.bincount(tau - 20, minlength=194).double()
    assert counts.std() / counts.mean() < 0.2


def test_empty_tau_interval_is_a_clear_error():
    with pytest.raises(ValueError, match="empty tau interval"):
        sample_tau(torch.tensor([25]), torch.tensor([0]), 900)


def test_transition_variance_is_exact_and_x_tau_decomposes_into_eps_eff(schedule):
    s = torch.tensor([0, 224, 449, 674])
    tau = torch.tensor([100, 300, 600, 850])
    ratio, beta = transition_coefficients(schedule, s, tau)
    assert ratio.dtype == beta.dtype == torch.float64
    torch.testing.assert_close((ratio * schedule.sigma(s)) ** 2 + beta**2, schedule.sigma(tau) ** 2)
    torch.testing.assert_close(ratio, schedule.alpha(tau) / schedule.alpha(s))

    gen = torch.Generator().manual_seed(1)
    x0_hat, eps_hat, z = (torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    a_s, s_s = schedule.coefficients(s, x0_hat)
    x_s = a_s * x0_hat + s_s * eps_hat  # the noisy trajectory point
    x_tau = diffuse(x_s, schedule, s, tau, z)
    eps_eff = effective_noise(eps_hat, z, schedule, s, tau)
    a_tau, s_tau = schedule.coefficients(tau, x0_hat)
    torch.testing.assert_close(x_tau, a_tau * x0_hat + s_tau * eps_eff, rtol=0, atol=1e-12)


def test_importance_weight_matches_its_formula_and_never_overflows():
    gen = torch.Generator().manual_seed(2)
    eps_eff = 1.3 * torch.randn(3, 4, 16, 16, generator=gen)
    z = torch.randn(3, 4, 16, 16, generator=gen)
    expected = [
        math.exp(-0.5 * float((e.double() ** 2).mean())) / math.exp(-0.5 * float((n.double() ** 2).mean()))
        for e, n in zip(eps_eff, z)
    ]
    assert importance_weight(eps_eff, z).tolist() == pytest.approx(expected, rel=1e-5)
    # high dimension, both N(0, I): close to 1; a sum instead of the mean would give exp(+-1000s)
    big_e, big_z = torch.randn(2, 4, 128, 128, generator=gen), torch.randn(2, 4, 128, 128, generator=gen)
    weight = importance_weight(big_e.half(), big_z.half())
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    assert weight.sub(1).abs().max() < 0.02


def test_min_snr_weight(schedule):
    tau = torch.tensor([20, 60, 500, 880])
    weight = min_snr_weight(schedule, tau)
    snr = schedule.snr(tau)
    assert weight.tolist() == pytest.approx(torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)).tolist())
    assert weight[0] == 5.0 and weight[-1] == pytest.approx(snr[-1].item())


def test_fake_score_loss_formula_and_gradient_stops_at_x0_hat(schedule):
    gen = torch.Generator().manual_seed(3)
    fake_x0 = torch.randn(4, 2, 4, 4, generator=gen, requires_grad=True)
    x0_hat = torch.randn(4, 2, 4, 4, generator=gen, requires_grad=True)
    tau = torch.tensor([30, 300, 600, 880])
    w = torch.tensor([0.9, 1.0, 1.1, 1.2])
    loss = fake_score_loss(fake_x0, x0_hat, tau, schedule, weight=w)
    per_sample = ((fake_x0 - x0_hat) ** 2).flatten(1).mean(1)
    expected = (min_snr_weight(schedule, tau).float() * w * per_sample).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert fake_x0.grad is not None and x0_hat.grad is None


def test_cfg_in_x0_space():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(cfg_x0(c, u, 4.5), c + 3.5 * (c - u))
    torch.testing.assert_close(cfg_x0(c, None, 1.0), c)
    with pytest.raises(ValueError, match="unconditional"):
        cfg_x0(c, None, 3.5)


def _generator_inputs():
    gen = torch.Generator().manual_seed(4)
    x0_hat = torch.randn(3, 4, 8, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 4, 8, 8, generator=gen)
    fake = torch.randn(3, 4, 8, 8, generator=gen)
    return x0_hat, teacher, fake


def test_normaliser_is_a_float64_per_sample_mean_abs():
    x0_hat, teacher, _ = _generator_inputs()
    w = generator_normalizer(x0_hat, teacher)
    assert w.dtype == torch.float64 and w.shape == (3,)
    torch.testing.assert_close(w, (x0_hat.detach().double() - teacher.double()).abs().flatten(1).mean(1))


def test_mse_generator_gradient_points_along_teacher_minus_fake_over_w():
    x0_hat, teacher, fake = _generator_inputs()
    target = generator_target(x0_hat, teacher, fake)
    assert not target.requires_grad
    w = generator_normalizer(x0_hat, teacher)
    generator_loss(x0_hat, target, w, "mse").backward()
    # d/dx0 mean((x0 - sg(x0 + f_w - f_psi))^2 / W) = -2 (f_w - f_psi) / (W * numel)
    expected = -2 * (teacher - fake) / (w.float()[:, None, None, None] * x0_hat.numel())
    torch.testing.assert_close(x0_hat.grad, expected)
    # descent moves x0_hat towards the teacher and away from the fake score
    direction = -x0_hat.grad
    assert (direction * (teacher - fake)).sum() > 0


def test_huber_elementwise_gradient():
    x0_hat, teacher, fake = _generator_inputs()
    target = generator_target(x0_hat, teacher, fake)
    w = generator_normalizer(x0_hat, teacher)
    generator_loss(x0_hat, target, w, "huber_elementwise", huber_c=1e-3).backward()
    d = teacher - fake
    expected = -d / torch.sqrt(d**2 + 1e-6) / (w.float()[:, None, None, None] * x0_hat.numel())
    torch.testing.assert_close(x0_hat.grad, expected)


def test_pseudo_huber_uses_the_paper_constant_and_no_normaliser():
    x0_hat, teacher, fake = _generator_inputs()
    c = pseudo_huber_constant(x0_hat)
    assert c == pytest.approx(0.00054 * math.sqrt(4 * 8 * 8))
    target = generator_target(x0_hat, teacher, fake)
    w = generator_normalizer(x0_hat, teacher)
    loss = generator_loss(x0_hat, target, 1000 * w, "pseudo_huber")  # W must not matter
    d = teacher - fake
    norm_sq = d.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(loss, (torch.sqrt(norm_sq + c**2) - c).mean())
    loss.backward()
    expected = -d / (torch.sqrt(norm_sq + c**2)[:, None, None, None] * 3)
    torch.testing.assert_close(x0_hat.grad, expected)


@pytest.mark.parametrize("loss_type", ["mse", "huber_elementwise", "pseudo_huber"])
def test_output_gain_weighting_moves_the_network_output_alike_at_every_step(schedule, loss_type):
    """Four samples, one per step of the grid, with the same x0-space error: under "none" the
    gradient on the network's raw (eps) output grows with the step's gain (60.3 / 0.8 = 75x from
    224 to 899); under "output_gain" it is the same for every sample."""
    t = torch.tensor(GRID)
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    error = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def output_grad_norms(mode):
        eps = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        eps.requires_grad_(True)
        x0_hat = schedule.x0_from_output(eps, x_t, t)
        target = x0_hat.detach() - error
        weight = generator_step_weight(schedule, t, mode)
        generator_loss(x0_hat, target, torch.ones(4, dtype=torch.float64), loss_type, sample_weight=weight).backward()
        return eps.grad.flatten(1).norm(dim=1)

    plain, balanced = output_grad_norms("none"), output_grad_norms("output_gain")
    gain = schedule.output_gain(t)
    torch.testing.assert_close(plain / plain[-1], gain / gain[-1], rtol=1e-9, atol=0)
    assert plain[0] / plain[-1] > 70
    torch.testing.assert_close(balanced, balanced[0].expand(4), rtol=1e-9, atol=0)


def test_output_gain_weights_are_the_inverse_gain_with_mean_one(schedule):
    t = torch.tensor([899, 899, 449, 224, 224])
    weight = generator_step_weight(schedule, t, "output_gain")
    assert weight.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(weight * schedule.output_gain(t), (weight * schedule.output_gain(t))[0].expand(5))
    assert generator_step_weight(schedule, t, "none") is None
    # TDM-unify: balanced within each step count K, every K keeping its share of the batch
    t_unify, k = torch.tensor([899, 899, 449, 899, 674, 449, 224]), torch.tensor([1, 2, 2, 4, 4, 4, 4])
    weight = generator_step_weight(schedule, t_unify, "output_gain", num_steps=k)
    assert weight[0].item() == pytest.approx(1.0)  # K = 1: one step, nothing to balance
    for members in (k == 2, k == 4):
        assert weight[members].mean().item() == pytest.approx(1.0)
        moved = weight[members] * schedule.output_gain(t_unify[members])
        torch.testing.assert_close(moved, moved[0].expand(len(moved)))
    with pytest.raises(ValueError, match="step weighting"):
        generator_step_weight(schedule, t, "snr")
    # the weight changes the loss, and only through the batch mean
    x0_hat, teacher, fake = _generator_inputs()
    target, w = generator_target(x0_hat, teacher, fake), generator_normalizer(x0_hat, teacher)
    per_sample = torch.stack([generator_loss(x0_hat[i:i + 1], target[i:i + 1], w[i:i + 1]) for i in range(3)])
    weights = torch.tensor([0.5, 1.0, 1.5])
    torch.testing.assert_close(generator_loss(x0_hat, target, w, sample_weight=weights), (weights * per_sample).mean())


def test_unknown_loss_and_options_are_refused():
    x0_hat, teacher, fake = _generator_inputs()
    with pytest.raises(ValueError, match="generator loss"):
        generator_loss(x0_hat, teacher, torch.ones(3), "l1")
    for bad in ({"tau_mode": "everywhere"}, {"mid_point": "random"}, {"generator_loss": "l1"}, {"guidance_scale": 0.5},
                {"generator_step_weighting": "snr"}):
        with pytest.raises(ValueError):
            TDMConfig(**bad)


class CountingLinear(torch.nn.Module):
    """An x0-predictor that records its calls: (timesteps, cond, grad enabled)."""

    def __init__(self, dim):
        super().__init__()
        self.layer = torch.nn.Linear(dim, dim)
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append((t.tolist(), cond, torch.is_grad_enabled()))
        return self.layer(x)


def test_one_iteration_reuses_the_rollout_and_sends_grad_only_through_the_student_step():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    torch.manual_seed(0)
    student, fake, teacher = CountingLinear(6), CountingLinear(6), CountingLinear(6)
    objective = TDMObjective(schedule, TDMConfig(guidance_scale=4.5))
    gen = torch.Generator().manual_seed(0)
    trajectory = objective.rollout(student, torch.randn(5, 6, generator=gen), cond="prompt")
    assert [c[0][0] for c in student.calls] == GRID and not any(c[2] for c in student.calls)

    fake_loss, stats = objective.fake_score_loss(fake, trajectory, cond="prompt", generator=gen)
    assert len(student.calls) == 4  # the fake branch reuses the rollout's predictions
    assert 0.0 < stats["importance_weight_mean"] < 10.0
    fake_loss.backward()
    assert fake.layer.weight.grad is not None and student.layer.weight.grad is None
    fake.zero_grad()

    gen_loss, _ = objective.generator_loss(student, teacher, fake, trajectory, "prompt", "", generator=gen)
    assert len(student.calls) == 5 and student.calls[-1][2]  # the one recomputation, with grad
    assert [c[1] for c in teacher.calls] == ["prompt", ""] and not any(c[2] for c in teacher.calls)
    assert not fake.calls[-1][2]
    gen_loss.backward()
    assert student.layer.weight.grad is not None and student.layer.weight.grad.abs().sum() > 0
    assert fake.layer.weight.grad is None and teacher.layer.weight.grad is None
    # every tau of the generator branch lies in its step's own interval (separate mode)
    for (t, _, _), (tau, _, _) in zip([student.calls[-1]], [teacher.calls[-1]]):
        for t_k, tau_k in zip(t, tau):
            s = {899: 674, 674: 449, 449: 224, 224: 0}[t_k]
            assert max(20, s) <= tau_k < t_k - 10


@pytest.mark.parametrize("unify", [None, (1, 2, 4)])
def test_the_objective_weighs_its_generator_loss_by_the_steps_it_drew(monkeypatch, unify):
    """TDMObjective.generator_loss hands generator_step_weight's weights for the steps it drew (and,
    for TDM-unify, each sample's K) to the loss; with "none" it hands none."""
    import tdm_train.distill as distill

    seen = []
    real_loss = distill.obj.generator_loss

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("sample_weight"))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill.obj, "generator_loss", spy)
    schedule = NoiseSchedule.from_diffusers_config(PIXART_SCHEDULER)
    for mode in ("none", "output_gain"):
        torch.manual_seed(0)
        student, fake, teacher = CountingLinear(6), CountingLinear(6), CountingLinear(6)
        objective = TDMObjective(schedule, TDMConfig(generator_step_weighting=mode, unify_steps=unify))
        gen = torch.Generator().manual_seed(1)
        trajectory = objective.rollout(student, torch.randn(48, 6, generator=gen), generator=gen)
        objective.generator_loss(student, teacher, fake, trajectory, generator=gen)
        t = torch.tensor(student.calls[-1][0])
        if mode == "none":
            assert seen[-1] is None
            continue
        expected = generator_step_weight(schedule, t, "output_gain", trajectory.num_steps if unify else None)
        torch.testing.assert_close(seen[-1], expected)
        assert len(t.unique()) > 1 and not torch.allclose(expected, torch.ones_like(expected))


def test_demo_mid_point_needs_a_uniform_grid():
    """mid_point 'demo' lands on t_k - (T_s // K - 1): on a uniform grid t_k = k*T_s//K - 1 (T_s =
    t_K + 1) that lies in [t_{k-1}, t_k); on any other grid it is refused, saying where it lands."""
    for grid in ((899, 674, 449, 224), (999, 749, 499, 249), (999, 665, 332), (9, 4), (500,)):
        config = TDMConfig(mid_point="demo", timesteps=grid)
        steps = torch.arange(len(grid))
        mids = mid_timesteps(steps, grid, "demo", total_steps=grid[0] + 1).tolist()
        assert all(nxt <= s < t for s, t, nxt in zip(mids, grid, list(grid[1:]) + [0])), (grid, mids)
        assert TDMObjective(NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER), config).timesteps == list(grid)
    with pytest.raises(ValueError, match=r"uniform grid .*T_s = 1000 gives \[999, 749, 499, 249\].*"
                                         r"at t = 999 it lands on s = 750, below the next grid point 856"):
        TDMConfig(mid_point="demo", timesteps=(999, 856, 665, 399))
    for grid in ((899, 650, 449, 224), (899, 674, 449, 200), (999, 750, 499, 249)):
        with pytest.raises(ValueError, match="uniform grid"):
            TDMConfig(mid_point="demo", timesteps=grid)
    TDMConfig(mid_point="grid", timesteps=(999, 856, 665, 399))  # the default mid point takes any grid
    TDMConfig(mid_point="demo", num_steps=3, total_steps=1000)  # the uniform grid by construction
