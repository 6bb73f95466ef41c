"""TDM on a 2-D mixture of 8 Gaussians with an exact teacher. Runs on a CPU in well under a minute.

Recipe (TDM_SPEC, "Known-good toy settings"): scaled_linear betas and the grid 899/674/449/224;
MLP x0-predictors with EDM preconditioning pre-fitted to the analytic teacher; then TDM with the
mse generator loss, AdamW betas (0, 0.95), lr 1e-4 (generator) / 5e-4 (fake score), batch 512.

``schedule="flow"`` runs the same method on rectified flow (x_t = (1 - sigma) x0 + sigma eps,
SD3's time shift), where the mixture's x0-predictor is exact too: the student grid is uniform in
unshifted time from pure noise (table indices 999/749/499/249 with T_s = 1000, i.e. the shifted
sigmas SD3 samples), the teacher's few-step baseline is Euler (DDIM on a flow schedule is exactly
the Euler step of the flow ODE), and every TDM term (diffusion between two levels, importance
weight, Min-SNR weighting with SNR = ((1 - sigma) / sigma)^2) is the general alpha/sigma form.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import atomic
from ..distill import TDMConfig, TDMObjective
from ..sampler import tdm_sample
from ..schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule
from ..timesteps import tdm_timesteps
from .gaussian_mixture import GaussianMixture
from .metrics import energy_distance
from .mlp import PreconditionedMLP
from .plot import scatter_panels

@dataclass
class GMMDemoConfig:
    seed: int = 0
    num_modes: int = 8
    radius: float = 1.5
    mode_std: float = 0.1
    prefit_iterations: int = 3000
    prefit_batch_size: int = 1024
    prefit_lr: float = 2e-3
    iterations: int = 500
    batch_size: int = 512
    generator_lr: float = 1e-4
    fake_lr: float = 5e-4
    adam_betas: tuple[float, float] = (0.0, 0.95)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    hidden: int = 128
    depth: int = 3
    eval_samples: int = 4000
    reference_steps: int = 100  # the teacher's many-step DDIM, for scale
    schedule: str = "ddpm"  # "ddpm" (SDXL's scaled_linear betas) or "flow" (rectified flow)
    flow_shift: float = 3.0  # SD3 / SD3.5's shift, for schedule="flow"
    tdm: TDMConfig = field(default_factory=TDMConfig)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


SCHEDULES = ("ddpm", "flow")


def demo_schedule(cfg: GMMDemoConfig) -> NoiseSchedule:
    if cfg.schedule == "flow":
        return NoiseSchedule.flow_matching(shift=cfg.flow_shift)
    return NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)


def _prefit(model: PreconditionedMLP, teacher, gmm: GaussianMixture, schedule, cfg: GMMDemoConfig, gen) -> float:
    """Regress the MLP onto the exact teacher over all timesteps (EDM weighting 1 / c_out^2)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.prefit_lr)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(cfg.prefit_iterations, 1))
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.prefit_iterations):
        x0 = gmm.sample(cfg.prefit_batch_size, gen)
        t = torch.randint(schedule.num_train_timesteps, (cfg.prefit_batch_size,), generator=gen)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        alpha, sigma = schedule.coefficients(t, x_t)
        sd = model.sigma_data
        c_out_sq = (sigma * sd) ** 2 / (sigma**2 + (alpha * sd) ** 2)
        loss = ((model(x_t, t) - teacher(x_t, t, None)) ** 2 / c_out_sq).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    return float(loss.detach())


def _quality(samples: torch.Tensor, reference: torch.Tensor, gmm: GaussianMixture) -> dict:
    fractions, in_mode = gmm.mode_fractions(samples)
    return {
        "energy_distance": energy_distance(samples, reference),
        "min_mode_fraction": float(fractions.min()),
        "in_mode_fraction": in_mode,
        "mode_fractions": [round(float(f), 4) for f in fractions],
    }


def run_gmm_demo(
    cfg: GMMDemoConfig | None = None, output_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> dict:
    """Pre-fit, distill with TDM, evaluate. Returns the quality figures; with ``output_dir``
    also writes ``samples.png``, ``metrics.json`` and ``student.safetensors`` there."""
    cfg = cfg or GMMDemoConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = demo_schedule(cfg)
    solver = "Euler" if cfg.schedule == "flow" else "DDIM"
    gmm = GaussianMixture.ring(cfg.num_modes, cfg.radius, cfg.mode_std)
    teacher = lambda x, t, cond: gmm.x0_posterior_mean(x, t, schedule)  # noqa: E731
    grid = cfg.tdm.grid(schedule.num_train_timesteps)

    started = time.perf_counter()
    student = PreconditionedMLP(schedule, hidden=cfg.hidden, depth=cfg.depth, sigma_data=gmm.data_std)
    prefit_loss = _prefit(student, teacher, gmm, schedule, cfg, gen)
    prefit_seconds = time.perf_counter() - started
    log(f"pre-fit to the teacher: {cfg.prefit_iterations} iterations, loss {prefit_loss:.4f}, {prefit_seconds:.1f}s")

    fake = copy.deepcopy(student)
    initial_student = copy.deepcopy(student).requires_grad_(False)
    objective = TDMObjective(schedule, cfg.tdm)
    student_opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.generator_lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    fake_opt = torch.optim.AdamW(fake.parameters(), lr=cfg.fake_lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)

    started = time.perf_counter()
    for iteration in range(1, cfg.iterations + 1):
        noise = torch.randn(cfg.batch_size, 2, generator=gen)
        trajectory = objective.rollout(student, noise)

        fake_loss, fake_stats = objective.fake_score_loss(fake, trajectory, generator=gen)
        fake_opt.zero_grad(set_to_none=True)
        fake_loss.backward()
        fake_opt.step()

        gen_loss, _ = objective.generator_loss(student, teacher, fake, trajectory, generator=gen)
        student_opt.zero_grad(set_to_none=True)
        gen_loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        student_opt.step()
        if iteration % max(cfg.iterations // 5, 1) == 0 or iteration == cfg.iterations:
            log(
                f"TDM iteration {iteration}/{cfg.iterations}: fake loss {fake_loss.item():.4f}, "
                f"generator loss {gen_loss.item():.4f}, IS weight {fake_stats.get('importance_weight_mean', 1):.3f}"
            )
    tdm_seconds = time.perf_counter() - started

    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    reference = gmm.sample(cfg.eval_samples, eval_gen)
    noise = torch.randn(cfg.eval_samples, 2, generator=eval_gen)
    with torch.no_grad():
        t0 = time.perf_counter()
        student_samples = tdm_sample(lambda x, t: student(x, t), noise, grid, schedule)
        student_seconds = time.perf_counter() - t0
        initial_samples = tdm_sample(lambda x, t: initial_student(x, t), noise, grid, schedule)
        teacher_fn = lambda x, t: teacher(x, t, None)  # noqa: E731
        teacher_samples = tdm_sample(teacher_fn, noise, grid, schedule)
        many_grid = tdm_timesteps(cfg.reference_steps, schedule.num_train_timesteps)
        t0 = time.perf_counter()
        many_samples = tdm_sample(
            lambda x, t: initial_student(x, t), noise, many_grid, schedule
        )  # the pre-fitted network at 100 steps: what the student would cost without distillation
        many_seconds = time.perf_counter() - t0
        teacher_many = tdm_sample(teacher_fn, noise, many_grid, schedule)
    data_again = gmm.sample(cfg.eval_samples, eval_gen)

    rows = {
        "data (second draw, noise floor)": _quality(data_again, reference, gmm),
        f"teacher, exact, {cfg.reference_steps}-step {solver}": _quality(teacher_many, reference, gmm),
        f"teacher, exact, {len(grid)}-step {solver}": _quality(teacher_samples, reference, gmm),
        f"pre-fit network, {cfg.reference_steps}-step {solver}": _quality(many_samples, reference, gmm),
        f"pre-fit network, {len(grid)}-step (before TDM)": _quality(initial_samples, reference, gmm),
        f"TDM student, {len(grid)}-step": _quality(student_samples, reference, gmm),
    }
    student_row = rows[f"TDM student, {len(grid)}-step"]
    teacher_row = rows[f"teacher, exact, {len(grid)}-step {solver}"]
    results = {
        "config": asdict(cfg),
        "timesteps": grid,
        "rows": rows,
        "student_energy_distance": student_row["energy_distance"],
        "teacher_ddim_energy_distance": teacher_row["energy_distance"],  # the few-step solver's (DDIM or Euler)
        "teacher_solver": solver,
        "energy_distance_ratio": student_row["energy_distance"] / teacher_row["energy_distance"],
        "min_mode_fraction": student_row["min_mode_fraction"],
        "prefit_seconds": prefit_seconds,
        "tdm_seconds": tdm_seconds,
        "student_vs_100step_wall_time": student_seconds / many_seconds,
    }
    log("")
    log(format_table(rows))
    log(
        f"\nstudent / teacher {len(grid)}-step {solver} energy distance: {results['energy_distance_ratio']:.3f}; "
        f"student {len(grid)} steps vs the same network at {cfg.reference_steps} steps: "
        f"{results['student_vs_100step_wall_time']:.3f}x the wall time"
    )

    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        extent = cfg.radius + 6 * cfg.mode_std + 0.5
        plot = scatter_panels(
            [
                ("data", reference[:2000]),
                (f"teacher {len(grid)}-step {solver}", teacher_samples[:2000]),
                (f"TDM student {len(grid)}-step", student_samples[:2000]),
            ],
            out / "samples.png",
            extent,
            marks=gmm.means,
        )
        atomic.write_text(out / "metrics.json", json.dumps(results, indent=2))
        _save_student(student, out / "student.safetensors", grid)
        results["plot"] = str(plot)
        log(f"wrote {plot}, {out / 'metrics.json'}, {out / 'student.safetensors'}")
    return results


def format_table(rows: dict[str, dict]) -> str:
    header = "| samples | energy distance to data | smallest mode share | share within 4 std of a mode |"
    lines = [header, "|---|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['energy_distance']:.4f} | {row['min_mode_fraction']:.3f} | {row['in_mode_fraction']:.3f} |"
        )
    return "\n".join(lines)


def _save_student(model: torch.nn.Module, path: Path, grid: list[int]) -> None:
    atomic.save_safetensors(model.state_dict(), path, {"tdm_timesteps": json.dumps(grid), "format": "pt"})
