"""The TDM few-step sampler: the student's training rollout and the inference sampler in one.

One step from timestep t to the next grid point t' (TDM_SPEC, "The student's trajectory"):

    x0_hat  = f(x_t, t)
    eps_hat = (x_t - alpha_t x0_hat) / sigma_t
    x_t'    = alpha_t' x0_hat + sigma_t' * noise,   noise = sqrt(1 - eta^2) eps_hat + eta z

eta = 0 is deterministic DDIM (what TDM trains); eta in (0, 1] re-noises with fresh z ~ N(0, I)
(eta = 1 is LCM-style multistep sampling), offered for inference only. The last step returns
x0_hat. The same two functions, :func:`predicted_noise` and :func:`renoise`, drive both
:func:`tdm_sample` (VP/flow form, integer timesteps, what the trainer calls) and
:func:`sample_tdm` (ComfyUI's k-diffusion calling convention, what the ComfyUI nodes call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .schedule import NoiseSchedule, compute_dtype
from .timesteps import validate_timesteps


def predicted_noise(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps_hat = (x_t - alpha x0_hat) / sigma: the noise that the x0 prediction implies."""
    return (x_t - alpha * x0_hat) / sigma


def renoise(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    alpha_next,
    sigma_next,
    eta: float = 0.0,
    fresh_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_next = alpha_next x0_hat + sigma_next (sqrt(1 - eta^2) eps_hat + eta z)."""
    if eta == 0.0:
        noise = eps_hat
    else:
        if fresh_noise is None:
            raise ValueError("eta > 0 needs fresh noise")
        noise = math.sqrt(1.0 - eta**2) * eps_hat + eta * fresh_noise.to(eps_hat.dtype)
    return alpha_next * x0_hat + sigma_next * noise


def check_eta(eta: float) -> float:
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = fresh noise each step), got {eta}")
    return eta


@dataclass
class TDMTrajectory:
    """Every point of a K-step rollout, noisiest first. ``states[k]`` is the input of step k
    (``states[0]`` the starting noise); ``x0_preds[k]``/``eps_preds[k]`` are that step's
    predictions. The trainer reuses them instead of running the student again."""

    timesteps: list[int]
    states: list[torch.Tensor] = field(default_factory=list)
    x0_preds: list[torch.Tensor] = field(default_factory=list)
    eps_preds: list[torch.Tensor] = field(default_factory=list)

    @property
    def sample(self) -> torch.Tensor:
        return self.x0_preds[-1]

    def gather(self, step_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample b, the state, timestep and predictions of step ``step_index[b]``:
        returns (x_t, t, x0_hat, eps_hat) with t a long tensor [B]."""
        batch = torch.arange(step_index.numel(), device=step_index.device)
        grid = torch.tensor(self.timesteps, device=step_index.device)
        pick = lambda seq: torch.stack(seq)[step_index, batch]  # noqa: E731
        return pick(self.states), grid[step_index], pick(self.x0_preds), pick(self.eps_preds)


X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tdm_sample(
    x0_fn: X0Fn,
    noise: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
):
    """Run the K-step TDM trajectory from pure N(0, I) ``noise`` at ``timesteps[0]``.

    ``x0_fn(x_t, t)`` predicts x0 for a batch (``t`` is a long tensor [B]). The state is kept in
    float32 (float64 if ``noise`` is float64) whatever dtype ``x0_fn`` computes in. Returns the
    final x0, or ``(x0, TDMTrajectory)`` with ``return_trajectory=True``.
    """
    grid = validate_timesteps(timesteps, schedule.num_train_timesteps)
    eta = check_eta(eta)
    x = noise.to(compute_dtype(noise))
    batch = x.shape[0]
    trajectory = TDMTrajectory(timesteps=grid)
    for index, t in enumerate(grid):
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        x0_hat = x0_fn(x, t_batch).to(x.dtype)
        alpha, sigma = schedule.coefficients(t, x)
        eps_hat = predicted_noise(x, x0_hat, alpha, sigma)
        if return_trajectory:
            trajectory.states.append(x)
            trajectory.x0_preds.append(x0_hat)
            trajectory.eps_preds.append(eps_hat)
        if index + 1 == len(grid):
            break
        alpha_next, sigma_next = schedule.coefficients(grid[index + 1], x)
        fresh = None
        if eta > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = renoise(x0_hat, eps_hat, alpha_next, sigma_next, eta, fresh)
    if return_trajectory:
        return x0_hat, trajectory
    return x0_hat


def _k_diffusion_coefficients(sigma: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the k-diffusion state: VE (x = x_t / alpha_t, so alpha = 1) for discrete
    VP models, rectified flow (alpha = 1 - sigma) for ComfyUI's CONST models."""
    return (1 - sigma, sigma) if flow else (torch.ones_like(sigma), sigma)


@torch.no_grad()
def sample_tdm(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    flow: bool = False,
) -> torch.Tensor:
    """The TDM sampler in ComfyUI's k-diffusion calling convention.

    ``model(x, sigma * s_in, **extra_args)`` returns x0; ``sigmas`` are the k-diffusion sigmas of
    the trained timesteps followed by 0 (for a VP model sigma = sigma_t / alpha_t and the state is
    x_t / alpha_t, so pure N(0, I) at t_K is ``noise * sqrt(1 + sigma_K^2)``). ``flow=True`` for
    rectified-flow (CONST) models. ``noise_sampler(sigma, sigma_next)`` supplies fresh noise when
    eta > 0; by default it draws from a generator seeded with ``extra_args["seed"]``. ``disable``
    is accepted for the k-diffusion protocol; progress and previews go through ``callback``.
    """
    extra_args = {} if extra_args is None else extra_args
    eta = check_eta(eta)
    if eta > 0 and noise_sampler is None:
        generator = torch.Generator(device=x.device).manual_seed(int(extra_args.get("seed", 0) or 0))
        noise_sampler = lambda sigma, sigma_next: torch.randn(  # noqa: E731
            x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0_hat})
        alpha, sigma_t = _k_diffusion_coefficients(sigma, flow)
        eps_hat = predicted_noise(x, x0_hat, alpha, sigma_t)
        alpha_next, sigma_t_next = _k_diffusion_coefficients(sigma_next, flow)
        fresh = noise_sampler(sigma, sigma_next) if eta > 0 and sigma_next > 0 else None
        x = renoise(x0_hat, eps_hat, alpha_next, sigma_t_next, eta if fresh is not None else 0.0, fresh)
    return x
