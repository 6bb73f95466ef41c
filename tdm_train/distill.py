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
    # "none" (paper, demo) or "output_gain": weigh each sample's generator loss by 1 / the x0 gain of
    # its step, so that the noisiest step does not dominate the shared weights (objectives.py)
    generator_step_weighting: str = "none"
    importance_weighting: bool = True
    snr_gamma: float | None = 5.0
    # sampling-steps-aware training ("TDM-unify"): K drawn per sample from this set, each on its
    # uniform grid; the student and the fake score are told each sample's K (see step_condition.py)
    unify_steps: tuple[int, ...] | None = None
    unify_weights: tuple[float, ...] | None = None  # probability of each K of unify_steps (None: uniform)

    def __post_init__(self):
        if self.unify_steps is not None:
            steps = tuple(int(k) for k in self.unify_steps)
            if not steps or any(k < 1 for k in steps) or len(set(steps)) != len(steps):
                raise ValueError(f"unify_steps must be distinct step counts >= 1, got {self.unify_steps}")
            if self.timesteps is not None:
                raise ValueError("unify_steps uses the uniform grid of each K: drop the explicit timesteps")
            if self.unify_weights is not None:
                weights = tuple(float(w) for w in self.unify_weights)
                if len(weights) != len(steps) or any(not w >= 0 for w in weights) or not sum(weights) > 0:
                    raise ValueError(f"unify_weights must be one weight >= 0 per step count of unify_steps "
                                     f"{self.unify_steps}, not all zero; got {self.unify_weights}")
                self.unify_weights = tuple(w for _, w in sorted(zip(steps, weights)))
            self.unify_steps = tuple(sorted(steps))
            self.num_steps = max(steps)
        elif self.unify_weights is not None:
            raise ValueError("unify_weights needs unify_steps")
        if self.tau_mode not in obj.TAU_MODES:
            raise ValueError(f"tau_mode must be one of {obj.TAU_MODES}, got {self.tau_mode!r}")
        if self.mid_point not in obj.MID_POINTS:
            raise ValueError(f"mid_point must be one of {obj.MID_POINTS}, got {self.mid_point!r}")
        if self.mid_point == "demo" and self.timesteps is not None:
            _check_uniform_for_demo_mid_point(tuple(self.timesteps))
        if self.generator_loss not in obj.GENERATOR_LOSSES:
            raise ValueError(f"generator_loss must be one of {obj.GENERATOR_LOSSES}, got {self.generator_loss!r}")
        if self.generator_step_weighting not in obj.GENERATOR_STEP_WEIGHTINGS:
            raise ValueError(f"generator_step_weighting must be one of {obj.GENERATOR_STEP_WEIGHTINGS}, "
                             f"got {self.generator_step_weighting!r}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    def grid(self, num_train_timesteps: int = 1000) -> list[int]:
        """The student's grid (for unify_steps: the one of the largest K)."""
        return tdm_timesteps(self.num_steps, self.total_steps, self.timesteps, num_train_timesteps)

    def grids(self, num_train_timesteps: int = 1000) -> dict[int, list[int]]:
        """Every K trained and its grid."""
        if self.unify_steps is None:
            grid = self.grid(num_train_timesteps)
            return {len(grid): grid}
        return {k: tdm_timesteps(k, self.total_steps, num_train_timesteps=num_train_timesteps) for k in self.unify_steps}


def _check_uniform_for_demo_mid_point(timesteps: tuple[int, ...]) -> None:
    """The demo's mid point s = t_k - (T_s // K - 1) is defined on a uniform grid only: the grid
    must equal t_k = k * T_s // K - 1 (k = K..1) for some T_s, and then T_s = t_K + 1. There s lies
    in [t_{k-1}, t_k) (the demo's 675/450/225/0 on 899/674/449/224); elsewhere it can fall below
    the next grid point (999,856,665,399: s = 750 at 999, below 856), which TDM_SPEC leaves
    undefined."""
    grid = [int(t) for t in timesteps]
    steps, total = len(grid), grid[0] + 1
    uniform = [k * total // steps - 1 for k in range(steps, 0, -1)]
    if grid == uniform:
        return
    offset = total // steps - 1
    below = [(t, max(t - offset, 0), nxt) for t, nxt in zip(grid, grid[1:] + [0]) if max(t - offset, 0) < nxt]
    where = (f": at t = {below[0][0]} it lands on s = {below[0][1]}, below the next grid point {below[0][2]}"
             if below else "")
    raise ValueError(
        f"mid_point 'demo' (s = t_k - (T_s/K - 1)) needs a uniform grid t_k = k*T_s//K - 1, and "
        f"{grid} is not one (T_s = {total} gives {uniform}){where}. Use mid_point 'grid' (the default: s = the "
        "next grid point), or the uniform grid (--num_steps/--total_steps instead of --student_timesteps)")


@dataclass
class RolloutBatch:
    """A batch of student trajectories, possibly of different lengths (TDM-unify): step k of
    sample b started from ``states[k, b]`` at timestep ``grid[b, k]``; ``grid[b, num_steps[b]]``
    is 0 (the level after the last step)."""

    states: torch.Tensor  # [K_max, B, ...]
    x0_preds: torch.Tensor
    eps_preds: torch.Tensor
    grid: torch.Tensor  # [B, K_max + 1], long
    num_steps: torch.Tensor  # [B], long

    @classmethod
    def from_trajectory(cls, trajectory: TDMTrajectory) -> RolloutBatch:
        states = torch.stack(trajectory.states)
        batch = states.shape[1]
        grid = torch.tensor(list(trajectory.timesteps) + [0], device=states.device).expand(batch, -1)
        return cls(states, torch.stack(trajectory.x0_preds), torch.stack(trajectory.eps_preds), grid,
                   torch.full((batch,), len(trajectory.timesteps), device=states.device))

    @property
    def batch_size(self) -> int:
        return self.states.shape[1]

    @property
    def sample(self) -> torch.Tensor:
        b = torch.arange(self.batch_size, device=self.states.device)
        return self.x0_preds[self.num_steps - 1, b]

    def gather(self, step_index: torch.Tensor):
        """(x_t, t, x0_hat, eps_hat) of step ``step_index[b]`` for every sample b."""
        b = torch.arange(self.batch_size, device=self.states.device)
        return self.states[step_index, b], self.grid[b, step_index], self.x0_preds[step_index, b], self.eps_preds[step_index, b]


def _select(cond, index: torch.Tensor):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


class TDMObjective:
    """Rollout, fake-score loss and generator loss of one TDM iteration.

    ``generator`` arguments are CPU ``torch.Generator``s: random draws happen on the CPU and
    move to the data's device, so a seed gives the same draws on every device."""

    def __init__(self, schedule: NoiseSchedule, config: TDMConfig | None = None):
        self.schedule = schedule
        self.config = config or TDMConfig()
        self.timesteps = self.config.grid(schedule.num_train_timesteps)
        self.grids = self.config.grids(schedule.num_train_timesteps)
        # tau must stay below T_s - margin in tail mode; an explicit grid implies T_s = t_K + 1
        self.total_steps = self.config.total_steps if self.config.timesteps is None else self.timesteps[0] + 1

    # -------------------------------------------------------------- shared pieces
    def _draw_steps(self, batch: RolloutBatch, generator) -> torch.Tensor:
        """A step index per sample, uniform over that sample's own K steps."""
        device = batch.states.device
        if self.config.unify_steps is None:
            return torch.randint(len(self.timesteps), (batch.batch_size,), generator=generator, device="cpu").to(device)
        u = torch.rand(batch.batch_size, generator=generator, dtype=torch.float64)
        return torch.floor(u * batch.num_steps.cpu().double()).long().to(device)

    def _mid(self, batch: RolloutBatch, step_index: torch.Tensor) -> torch.Tensor:
        return obj.mid_timesteps_per_sample(step_index, batch.grid, batch.num_steps, self.config.mid_point,
                                            self.total_steps)

    def _tell_the_steps(self, role, num_steps: torch.Tensor | None) -> None:
        """With unify_steps, a role that can be conditioned on K (it has ``set_num_steps``: the
        student and the fake score) is told each sample's K for the calls that follow; None clears it."""
        if self.config.unify_steps is not None and hasattr(role, "set_num_steps"):
            role.set_num_steps(num_steps)

    def _told(self, role, num_steps: torch.Tensor, *args):
        """``role(*args)`` with each sample's K told for that one call."""
        self._tell_the_steps(role, num_steps)
        try:
            return role(*args)
        finally:
            self._tell_the_steps(role, None)

    def _diffused_point(self, x0_hat, eps_hat, t, s, generator):
        """From the student's prediction at t, the trajectory point x_s and its diffusion to tau.
        Returns (x_tau, tau, z)."""
        cfg = self.config
        tau = obj.sample_tau(t, s, self.total_steps, cfg.tau_mode, cfg.min_tau, cfg.tau_margin, generator=generator)
        alpha_s, sigma_s = self.schedule.coefficients(s, x0_hat)
        x_s = alpha_s * x0_hat + sigma_s * eps_hat  # the noisy trajectory point, never x0_hat itself
        z = torch.randn(x_s.shape, generator=generator, device="cpu", dtype=x_s.dtype).to(x_s.device)
        return obj.diffuse(x_s, self.schedule, s, tau, z), tau, z

    # -------------------------------------------------------------- the three parts
    @torch.no_grad()
    def rollout(self, student: X0Predictor, noise: torch.Tensor, cond=None,
                generator: torch.Generator | None = None) -> RolloutBatch:
        """The student's trajectories from pure noise (no grad); every point is kept. With
        unify_steps each sample draws its K (from ``generator``) and runs on that K's grid."""
        if self.config.unify_steps is None:
            _, trajectory = tdm_sample(
                lambda x, t: student(x, t, cond), noise, self.timesteps, self.schedule, return_trajectory=True
            )
            return RolloutBatch.from_trajectory(trajectory)
        choices = torch.tensor(self.config.unify_steps)
        if self.config.unify_weights is None:
            draw = torch.randint(len(choices), (noise.shape[0],), generator=generator)
        else:
            weights = torch.tensor(self.config.unify_weights, dtype=torch.float64)
            draw = torch.multinomial(weights, noise.shape[0], replacement=True, generator=generator)
        ks = choices[draw].to(noise.device)
        k_max = max(self.config.unify_steps)
        shape = (k_max, *noise.shape)
        dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        states, x0s, epss = (torch.zeros(shape, dtype=dtype, device=noise.device) for _ in range(3))
        grid = torch.zeros(noise.shape[0], k_max + 1, dtype=torch.long, device=noise.device)
        for k in ks.unique().tolist():
            index = (ks == k).nonzero(as_tuple=True)[0]
            sub_cond = _select(cond, index)
            steps = torch.full((len(index),), k, dtype=torch.long, device=noise.device)
            _, trajectory = tdm_sample(lambda x, t: self._told(student, steps, x, t, sub_cond), noise[index],
                                       self.grids[k], self.schedule, return_trajectory=True)
            states[:k, index] = torch.stack(trajectory.states)
            x0s[:k, index] = torch.stack(trajectory.x0_preds)
            epss[:k, index] = torch.stack(trajectory.eps_preds)
            grid[index, :k] = torch.tensor(self.grids[k], device=noise.device)
        return RolloutBatch(states, x0s, epss, grid, ks)

    def fake_score_loss(
        self, fake: X0Predictor, trajectory: RolloutBatch, cond=None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Denoising score matching of the fake score on diffused trajectory points (grad on psi only)."""
        step_index = self._draw_steps(trajectory, generator)
        _, t, x0_hat, eps_hat = trajectory.gather(step_index)  # reused from the rollout, no recompute
        s = self._mid(trajectory, step_index)
        x_tau, tau, z = self._diffused_point(x0_hat, eps_hat, t, s, generator)
        weight = None
        if self.config.importance_weighting:
            weight = obj.importance_weight(obj.effective_noise(eps_hat, z, self.schedule, s, tau), z)
        fake_x0 = self._told(fake, trajectory.num_steps, x_tau, tau, cond)
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
        trajectory: RolloutBatch,
        cond=None,
        uncond=None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Distribution matching of the student: the one student step recomputed WITH grad; the
        teacher (with CFG) and the fake score run without grad on its diffused point."""
        cfg = self.config
        step_index = self._draw_steps(trajectory, generator)
        x_t, t, _, _ = trajectory.gather(step_index)
        x0_hat = self._told(student, trajectory.num_steps, x_t, t, cond).to(x_t.dtype)
        alpha_t, sigma_t = self.schedule.coefficients(t, x_t)
        eps_hat = predicted_noise(x_t, x0_hat, alpha_t, sigma_t)
        s = self._mid(trajectory, step_index)
        x_tau, tau, _ = self._diffused_point(x0_hat, eps_hat, t, s, generator)
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
            fake_x0 = self._told(fake, trajectory.num_steps, x_tau, tau, cond)
            target = obj.generator_target(x0_hat, teacher_x0, fake_x0)
            normalizer = obj.generator_normalizer(x0_hat, teacher_x0)
        weight = obj.generator_step_weight(self.schedule, t, cfg.generator_step_weighting,
                                           trajectory.num_steps if cfg.unify_steps else None)
        loss = obj.generator_loss(x0_hat, target, normalizer, cfg.generator_loss, cfg.huber_c, weight)
        return loss, {"normalizer_mean": normalizer.mean().item()}

