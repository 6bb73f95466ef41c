"""One TDM iteration written once against the x0-predictor protocol.

A role is any callable ``f(x_t, t, cond) -> x0`` (t a long tensor [B]): the teacher (frozen),
the student (trained), the fake score (trained online on the student's samples). The training
loop stays explicit, accelerate-style:

    trajectory = objective.rollout(student, noise, cond)
    loss_fake, _ = objective.fake_score_loss(fake, trajectory, cond, generator)
    loss_fake.backward(); fake_optimizer.step(); fake_optimizer.zero_grad()
    loss_gen, _ = objective.generator_loss(student, teacher, fake, trajectory, cond, uncond, generator)
    loss_gen.backward(); clip_grad_norm_(student_params, 1.0); student_optimizer.step(); ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import objectives as obj
from .sampler import TDMTrajectory, predicted_noise, tdm_sample
from .schedule import NoiseSchedule
from .timesteps import tdm_timesteps

# f(x_t, t, cond) -> x0. A teacher may also offer paired(x_t, t, cond, uncond) -> (x0_cond, x0_uncond)
# that evaluates both in one batched forward; the generator loss uses it when CFG is on.
X0Predictor = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class TDMConfig:
    """The choices of TDM_SPEC; defaults follow the spec (paper where it and the demo differ,
    unless the spec names the demo's choice as default)."""

    num_steps: int = 4
    total_steps: int = 900
    timesteps: tuple[int, ...] | None = None  # explicit grid; default t_k = k*total_steps//K - 1
    tau_mode: str = "separate"  # "separate" (each step owns its interval) or "tail"
    mid_point: str = "grid"  # "grid" (next grid point) or "demo" (t_k - (T_s/K - 1))
    min_tau: int = 20
    tau_margin: int = 10
    guidance_scale: float = 1.0  # CFG folded into the teacher (demo 4.5, paper PixArt 3.5, SDXL 8)
    generator_loss: str = "mse"  # "mse", "huber_elementwise" (demo), "pseudo_huber" (paper)
    huber_c: float = 1e-3
    importance_weighting: bool = True
    snr_gamma: float | None = 5.0

    def __post_init__(self):
        if self.tau_mode not in obj.TAU_MODES:
            raise ValueError(f"tau_mode must be one of {obj.TAU_MODES}, got {self.tau_mode!r}")
        if self.mid_point not in obj.MID_POINTS:
            raise ValueError(f"mid_point must be one of {obj.MID_POINTS}, got {self.mid_point!r}")
        if self.generator_loss not in obj.GENERATOR_LOSSES:
            raise ValueError(f"generator_loss must be one of {obj.GENERATOR_LOSSES}, got {self.generator_loss!r}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    def grid(self, num_train_timesteps: int = 1000) -> list[int]:
        return tdm_timesteps(self.num_steps, self.total_steps, self.timesteps, num_train_timesteps)


class TDMObjective:
    """Rollout, fake-score loss and generator loss of one TDM iteration.

    ``generator`` arguments are CPU ``torch.Generator``s: random draws happen on the CPU and
    move to the data's device, so a seed gives the same draws on every device."""

    def __init__(self, schedule: NoiseSchedule, config: TDMConfig | None = None):
        self.schedule = schedule
        self.config = config or TDMConfig()
        self.timesteps = self.config.grid(schedule.num_train_timesteps)
        # tau must stay below T_s - margin in tail mode; an explicit grid implies T_s = t_K + 1
        self.total_steps = self.config.total_steps if self.config.timesteps is None else self.timesteps[0] + 1

    # -------------------------------------------------------------- shared pieces
    def _draw_steps(self, batch: int, device, generator) -> torch.Tensor:
        return torch.randint(len(self.timesteps), (batch,), generator=generator, device="cpu").to(device)

    def _diffused_point(self, x0_hat, eps_hat, t, step_index, generator):
        """From the student's prediction at t, the trajectory point x_s and its diffusion to tau.
        Returns (x_tau, tau, s, z)."""
        cfg = self.config
        s = obj.mid_timesteps(step_index, self.timesteps, cfg.mid_point, self.total_steps)
        tau = obj.sample_tau(t, s, self.total_steps, cfg.tau_mode, cfg.min_tau, cfg.tau_margin, generator=generator)
        alpha_s, sigma_s = self.schedule.coefficients(s, x0_hat)
        x_s = alpha_s * x0_hat + sigma_s * eps_hat  # the noisy trajectory point, never x0_hat itself
        z = torch.randn(x_s.shape, generator=generator, device="cpu", dtype=x_s.dtype).to(x_s.device)
        return obj.diffuse(x_s, self.schedule, s, tau, z), tau, s, z

    # -------------------------------------------------------------- the three parts
    @torch.no_grad()
    def rollout(self, student: X0Predictor, noise: torch.Tensor, cond=None) -> TDMTrajectory:
        """The student's K-step trajectory from pure noise (no grad); every point is kept."""
        _, trajectory = tdm_sample(
            lambda x, t: student(x, t, cond), noise, self.timesteps, self.schedule, return_trajectory=True
        )
        return trajectory

    def fake_score_loss(
        self, fake: X0Predictor, trajectory: TDMTrajectory, cond=None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Denoising score matching of the fake score on diffused trajectory points (grad on psi only)."""
        batch = trajectory.states[0].shape[0]
        step_index = self._draw_steps(batch, trajectory.states[0].device, generator)
        _, t, x0_hat, eps_hat = trajectory.gather(step_index)  # reused from the rollout, no recompute
        x_tau, tau, s, z = self._diffused_point(x0_hat, eps_hat, t, step_index, generator)
        weight = None
        if self.config.importance_weighting:
            weight = obj.importance_weight(obj.effective_noise(eps_hat, z, self.schedule, s, tau), z)
        fake_x0 = fake(x_tau, tau, cond)
        loss = obj.fake_score_loss(fake_x0, x0_hat, tau, self.schedule, weight, self.config.snr_gamma)
        stats = {"tau_mean": tau.double().mean().item()}
        if weight is not None:
            stats["importance_weight_mean"] = weight.mean().item()
        return loss, stats

    def generator_loss(
        self,
        student: X0Predictor,
        teacher: X0Predictor,
        fake: X0Predictor,
        trajectory: TDMTrajectory,
        cond=None,
        uncond=None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Distribution matching of the student: the one student step recomputed WITH grad; the
        teacher (with CFG) and the fake score run without grad on its diffused point."""
        cfg = self.config
        batch = trajectory.states[0].shape[0]
        step_index = self._draw_steps(batch, trajectory.states[0].device, generator)
        x_t, t, _, _ = trajectory.gather(step_index)
        x0_hat = student(x_t, t, cond).to(x_t.dtype)
        alpha_t, sigma_t = self.schedule.coefficients(t, x_t)
        eps_hat = predicted_noise(x_t, x0_hat, alpha_t, sigma_t)
        x_tau, tau, _, _ = self._diffused_point(x0_hat, eps_hat, t, step_index, generator)
        x_tau = x_tau.detach()
        with torch.no_grad():
            paired = getattr(teacher, "paired", None)
            if cfg.guidance_scale == 1.0:
                teacher_cond, teacher_uncond = teacher(x_tau, tau, cond), None
            elif paired is not None:  # conditional and unconditional in one batched forward
                teacher_cond, teacher_uncond = paired(x_tau, tau, cond, uncond)
            else:
                teacher_cond, teacher_uncond = teacher(x_tau, tau, cond), teacher(x_tau, tau, uncond)
            teacher_x0 = obj.cfg_x0(teacher_cond, teacher_uncond, cfg.guidance_scale)
            fake_x0 = fake(x_tau, tau, cond)
            target = obj.generator_target(x0_hat, teacher_x0, fake_x0)
            normalizer = obj.generator_normalizer(x0_hat, teacher_x0)
        loss = obj.generator_loss(x0_hat, target, normalizer, cfg.generator_loss, cfg.huber_c)
        return loss, {"normalizer_mean": normalizer.mean().item()}

