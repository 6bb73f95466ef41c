"""The pieces of the TDM objective (TDM_SPEC, "One training iteration"), one function each.

All schedule arithmetic (transition coefficients, effective noise, importance weight, SNR,
normaliser) runs in float32 or float64 whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .schedule import NoiseSchedule, compute_dtype

TAU_MODES = ("separate", "tail")
MID_POINTS = ("grid", "demo")
GENERATOR_LOSSES = ("mse", "huber_elementwise", "pseudo_huber")
GENERATOR_STEP_WEIGHTINGS = ("none", "output_gain")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to broadcast against ``like`` ([B, ...])."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: one number per sample (never a sum: sums of
    squared noise over 16k latent dims overflow exp())."""
    return x.flatten(1).mean(dim=1)


def mid_timesteps(
    step_index: torch.Tensor, timesteps: Sequence[int], mid_point: str = "grid", total_steps: int | None = None
) -> torch.Tensor:
    """The level s that step ``step_index`` (0 = noisiest) lands on: the next grid point, 0 after
    the last step ("grid", the default); or the demo's t_k - (total_steps // K - 1) ("demo":
    675/450/225/0 instead of 674/449/224/0 on the 900-step grid)."""
    grid = torch.tensor(list(timesteps) + [0], device=step_index.device).expand(step_index.numel(), -1)
    num_steps = torch.full_like(step_index, len(timesteps))
    return mid_timesteps_per_sample(step_index, grid, num_steps, mid_point, total_steps)


def mid_timesteps_per_sample(
    step_index: torch.Tensor, grid: torch.Tensor, num_steps: torch.Tensor, mid_point: str = "grid",
    total_steps: int | None = None,
) -> torch.Tensor:
    """:func:`mid_timesteps` when every sample has its own grid (TDM-unify): ``grid`` [B, K_max + 1]
    holds each sample's timesteps followed by 0, ``num_steps`` [B] its K."""
    if mid_point not in MID_POINTS:
        raise ValueError(f"mid_point must be one of {MID_POINTS}, got {mid_point!r}")
    batch = torch.arange(step_index.numel(), device=step_index.device)
    if mid_point == "grid":
        return grid[batch, step_index + 1]
    if total_steps is None:
        raise ValueError("mid_point='demo' needs total_steps")
    return (grid[batch, step_index] - (total_steps // num_steps - 1)).clamp_min(0)


def sample_tau(
    t: torch.Tensor,
    s: torch.Tensor,
    total_steps: int,
    mode: str = "separate",
    min_tau: int = 20,
    margin: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the diffusion level tau per sample, uniformly over the integers of
    [max(min_tau, s), t - margin) in "separate" mode (each step owns its interval) or
    [max(min_tau, s), total_steps - margin) in "tail" mode."""
    if mode not in TAU_MODES:
        raise ValueError(f"tau mode must be one of {TAU_MODES}, got {mode!r}")
    low = s.clamp_min(min_tau)
    high = (t - margin) if mode == "separate" else torch.full_like(t, total_steps - margin)
    if (high <= low).any():
        bad = [(int(a), int(b)) for a, b in zip(low.tolist(), high.tolist()) if b <= a]
        raise ValueError(
            f"empty tau interval(s) {bad} for mode {mode!r}: the grid's steps are too close for "
            f"min_tau={min_tau}, margin={margin}"
        )
    u = torch.rand(t.shape, generator=generator, dtype=torch.float64).to(t.device)  # CPU draw: same on every device
    return low + torch.floor(u * (high - low).double()).long()


def transition_coefficients(schedule: NoiseSchedule, s, tau) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_tau | x_s) = N(ratio x_s, beta^2 I): ratio = alpha_tau / alpha_s and
    beta^2 = sigma_tau^2 - (ratio sigma_s)^2, in float64."""
    alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
    alpha_tau, sigma_tau = schedule.alpha(tau), schedule.sigma(tau)
    ratio = alpha_tau / alpha_s
    beta = (sigma_tau**2 - (ratio * sigma_s) ** 2).clamp_min(0).sqrt()
    return ratio, beta


def diffuse(x_s: torch.Tensor, schedule: NoiseSchedule, s, tau, z: torch.Tensor) -> torch.Tensor:
    """x_tau = (alpha_tau / alpha_s) x_s + beta z: forward-diffuse a trajectory point from s to tau."""
    dtype = compute_dtype(x_s)
    ratio, beta = transition_coefficients(schedule, s, tau)
    ratio, beta = (_per_sample(c.to(x_s.device, dtype), x_s) for c in (ratio, beta))
    return ratio * x_s.to(dtype) + beta * z.to(dtype)


def effective_noise(eps_hat: torch.Tensor, z: torch.Tensor, schedule: NoiseSchedule, s, tau) -> torch.Tensor:
    """eps_eff = ((alpha_tau / alpha_s) sigma_s eps_hat + beta z) / sigma_tau, so that
    x_tau = alpha_tau x0_hat + sigma_tau eps_eff exactly."""
    dtype = compute_dtype(eps_hat)
    ratio, beta = transition_coefficients(schedule, s, tau)
    scale_eps = _per_sample((ratio * schedule.sigma(s) / schedule.sigma(tau)).to(eps_hat.device, dtype), eps_hat)
    scale_z = _per_sample((beta / schedule.sigma(tau)).to(eps_hat.device, dtype), eps_hat)
    return scale_eps * eps_hat.to(dtype) + scale_z * z.to(dtype)


def importance_weight(eps_eff: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The demo's per-sample weight exp(-mean(eps_eff^2) / 2) / exp(-mean(z^2) / 2): the density
    of x_tau under q(x_tau | x0_hat) over the proposal q(x_tau | x_s), with the normalising
    constants dropped and a mean over dimensions in place of the sum (a tempered heuristic that
    stays near 1 in high dimension)."""
    dtype = compute_dtype(eps_eff)
    log_w = 0.5 * (_mean_over_dims(z.to(dtype) ** 2) - _mean_over_dims(eps_eff.to(dtype) ** 2))
    return torch.exp(log_w)


def min_snr_weight(schedule: NoiseSchedule, tau, gamma: float = 5.0) -> torch.Tensor:
    """min(SNR_tau, gamma) in float64 (Min-SNR-5 on an x0 loss is min(1, 5 / SNR) on the eps loss)."""
    return schedule.snr(tau).clamp_max(gamma)


def fake_score_loss(
    fake_x0: torch.Tensor,
    x0_hat: torch.Tensor,
    tau,
    schedule: NoiseSchedule,
    weight: torch.Tensor | None = None,
    snr_gamma: float | None = 5.0,
) -> torch.Tensor:
    """mean_batch[ min(SNR_tau, gamma) * w * mean_dims((f_psi(x_tau) - sg(x0_hat))^2) ]."""
    dtype = compute_dtype(fake_x0)
    per_sample = _mean_over_dims((fake_x0.to(dtype) - x0_hat.detach().to(dtype)) ** 2)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(schedule, tau, snr_gamma).to(per_sample.device, dtype)
    if weight is not None:
        per_sample = per_sample * weight.detach().to(dtype)
    return per_sample.mean()


def cfg_x0(cond_x0: torch.Tensor, uncond_x0: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in x0 space: f_c + (w - 1)(f_c - f_u) (equal to CFG in eps space
    at a fixed (x_tau, tau))."""
    if guidance_scale == 1.0 or uncond_x0 is None:
        if guidance_scale != 1.0:
            raise ValueError("guidance_scale != 1 needs the unconditional prediction")
        return cond_x0
    return cond_x0 + (guidance_scale - 1.0) * (cond_x0 - uncond_x0)


def generator_target(x0_hat: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """x_tilde = sg(x0_hat + f_teacher_cfg - f_fake): the student's prediction moved along the
    score difference (s_teacher - s_fake is (alpha / sigma^2)(f_teacher - f_fake))."""
    dtype = compute_dtype(x0_hat)
    return (x0_hat.detach().to(dtype) + teacher_x0.detach().to(dtype) - fake_x0.detach().to(dtype)).detach()


def generator_normalizer(x0_hat: torch.Tensor, teacher_x0: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """W = sg(mean_dims |x0_hat - f_teacher_cfg|) per sample, in float64 as in the demo. The floor
    only guards the degenerate case x0_hat == f_teacher exactly (W = 0)."""
    diff = (x0_hat.detach().double() - teacher_x0.detach().double()).abs()
    return _mean_over_dims(diff).clamp_min(floor)


def generator_step_weight(schedule: NoiseSchedule, t, mode: str = "none",
                          num_steps: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-sample weight of the generator loss by the student step t each sample trains.

    The generator's gradient is computed on x0_hat, and the normaliser W makes it O(1) per element
    at every step; but the network's raw output reaches x0_hat with the gain |d x0 / d output| of
    its step (schedule.output_gain: for eps-prediction on DDPM's linear betas 60.3 at t = 899, 10.0
    at 674, 2.6 at 449, 0.8 at 224), so on the shared weights the noisiest step's samples dominate
    the update ~75 to 1 over the last step's. ``"none"`` keeps that (the paper and the demo);
    ``"output_gain"`` weighs each sample by 1 / gain, normalised to mean 1 over the samples of the
    same step count K (``num_steps`` [B], TDM-unify; None: the whole batch), so that within a
    trajectory every step moves the network's output alike while each K keeps its share of the
    batch. Returns None for ``"none"``."""
    if mode not in GENERATOR_STEP_WEIGHTINGS:
        raise ValueError(f"generator step weighting must be one of {GENERATOR_STEP_WEIGHTINGS}, got {mode!r}")
    if mode == "none":
        return None
    # a step whose x0 does not move with the output (gain 0: sigma_t = 0) is held to a finite weight
    inverse_gain = 1.0 / schedule.output_gain(torch.as_tensor(t).cpu()).clamp_min(1e-6)
    groups = torch.zeros_like(inverse_gain, dtype=torch.long) if num_steps is None else torch.as_tensor(num_steps).cpu()
    weight = torch.empty_like(inverse_gain)
    for k in groups.unique():
        members = groups == k
        weight[members] = inverse_gain[members] / inverse_gain[members].mean()
    return weight


def pseudo_huber_constant(x0_hat: torch.Tensor) -> float:
    """The paper's c = 0.00054 sqrt(d), d = dimensions of one sample."""
    return 0.00054 * math.sqrt(x0_hat[0].numel())


def generator_loss(
    x0_hat: torch.Tensor,
    target: torch.Tensor,
    normalizer: torch.Tensor,
    loss_type: str = "mse",
    huber_c: float = 1e-3,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generator loss on x0_hat (the only path by which the gradient reaches the student).

    - ``mse``: mean((x0_hat - x_tilde)^2 / W)
    - ``huber_elementwise`` (demo): mean((sqrt((x0_hat - x_tilde)^2 + c^2) - c) / W), c = huber_c
    - ``pseudo_huber`` (paper): per sample sqrt(||x0_hat - x_tilde||^2 + c^2) - c with
      c = 0.00054 sqrt(d), not divided by W (it normalises itself); mean over the batch.

    ``sample_weight`` [B] (:func:`generator_step_weight`) weighs each sample's loss in the batch mean.
    """
    if loss_type not in GENERATOR_LOSSES:
        raise ValueError(f"generator loss must be one of {GENERATOR_LOSSES}, got {loss_type!r}")
    dtype = compute_dtype(x0_hat)
    diff = x0_hat.to(dtype) - target.detach().to(dtype)
    if loss_type == "pseudo_huber":
        c = pseudo_huber_constant(x0_hat)
        norm_sq = diff.flatten(1).pow(2).sum(dim=1)
        per_sample = torch.sqrt(norm_sq + c**2) - c
    else:
        w = _per_sample(normalizer.detach().to(x0_hat.device, dtype), diff)
        per_element = diff**2 if loss_type == "mse" else torch.sqrt(diff**2 + huber_c**2) - huber_c
        per_sample = _mean_over_dims(per_element / w)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.detach().to(per_sample.device, dtype)
    return per_sample.mean()
