"""The embedded default: distil the shipped digits teacher with TDM on the CPU and measure the
paper's claim at small scale (a 4-step student against its 50-step teacher and against the best
training-free 4-step solver).

Both students go through the same trainer as SDXL / PixArt / CogVideoX (TDMTrainer over the
toy DigitsBackend): a K = 4 student and a sampling-steps-aware one (K in {1, 2, 4}, told K through
its own K embedding). The table measures the students as saved: their LoRA files, and for the
unify student its K condition, applied for the K of each row.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import atomic
from ...backends.digits import DigitsBackend
from ...distill import TDMConfig
from ...lora.export import DIFFUSERS_FILE
from ...objectives import cfg_x0
from ...sampler import tdm_sample
from ...timesteps import tdm_timesteps
from ...training.trainer import TDMTrainer, TrainConfig
from .classifier import load_classifier
from .data import NULL_CLASS, NUM_CLASSES, load_digits_tensors
from .metrics import digits_quality
from .teacher import SCHEDULER_CONFIG, load_teacher


@dataclass
class DigitsDemoConfig:
    seed: int = 0
    iterations: int = 250  # TDM iterations of the 4-step student
    unify_iterations: int = 200  # TDM-unify iterations (its rollouts are shorter on average: ~0.87x the cost)
    unify_steps: tuple[int, ...] = (1, 2, 4)
    unify_weights: tuple[float, ...] | None = None  # how often each K is drawn (None: uniform)
    # lr of the unify student's K embedding / the generator lr (its c_K must grow from zero within the run)
    step_embedding_lr_ratio: float = 10.0
    batch_size: int = 64
    learning_rate: float = 1.5e-3  # fake score; the student's is lr / 5
    lora_rank: int = 16
    lora_alpha: float = 16.0
    guidance_scale: float = 2.0  # CFG of the teacher, in its rows and folded into TDM's target
    generator_lr_ratio: float = 0.2  # the student's lr / learning_rate (the demo's 1/5)
    # TDM's choices for both students (TDM_SPEC; the library's defaults)
    generator_loss: str = "mse"
    tau_mode: str = "separate"
    mid_point: str = "grid"
    importance_weighting: bool = True
    generator_step_weighting: str = "none"
    eval_samples: int = 2000
    teacher_steps: int = 50
    threads: int | None = None

    def tdm(self, **student) -> TDMConfig:
        """The TDM settings of one student: this config's choices plus the student's own (its grid,
        or its unify set)."""
        return TDMConfig(guidance_scale=self.guidance_scale, generator_loss=self.generator_loss, tau_mode=self.tau_mode,
                         mid_point=self.mid_point, importance_weighting=self.importance_weighting,
                         generator_step_weighting=self.generator_step_weighting, **student)


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


def _teacher_x0(backend: DigitsBackend, unet, scale: float):
    """The teacher with CFG in x0 space (cond and uncond in one batched call)."""

    def x0_fn(x, t, labels):
        both = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        eps = unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=both).sample
        x0 = backend.schedule.x0_from_output(eps, torch.cat([x, x]), torch.cat([t, t]))
        cond, uncond = x0.chunk(2)
        return cfg_x0(cond, uncond, scale)

    return x0_fn


@torch.no_grad()
def _dpmsolver(unet, backend: DigitsBackend, noise, labels, steps: int, scale: float) -> torch.Tensor:
    """diffusers' DPM-Solver++ (2nd order multistep) with CFG: the training-free few-step baseline."""
    from diffusers import DPMSolverMultistepScheduler

    config = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    scheduler = DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    both = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    for t in scheduler.timesteps:
        eps_c, eps_u = unet(torch.cat([x, x]), t.repeat(2 * len(labels)), class_labels=both).sample.chunk(2)
        x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    return x


def distil_student(teacher, cfg: DigitsDemoConfig, out: Path, tdm: TDMConfig, iterations: int,
                   progress: bool = True, on_step=None, ema_decay: float | None = None) -> TDMTrainer:
    """One digits student: TDMTrainer over the DigitsBackend with the demo's recipe (``tdm`` says
    which student: its grid, or its unify set), saved to ``out``; returns the trained trainer.
    ``on_step(trainer)`` runs after every iteration (TDMTrainer.train); ``ema_decay`` turns on the
    trainer's EMA of the student (``use_ema``), which is then what is saved."""
    ema = {} if ema_decay is None else {"use_ema": True, "ema_decay": ema_decay}
    backend = DigitsBackend(copy.deepcopy(teacher), SCHEDULER_CONFIG, NULL_CLASS)
    config = TrainConfig(output_dir=str(out), max_train_steps=iterations, train_batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                         generator_lr_ratio=cfg.generator_lr_ratio, checkpointing_steps=iterations,
                         checkpoints_total_limit=1, seed=cfg.seed, tdm=tdm,
                         step_embedding_lr_ratio=cfg.step_embedding_lr_ratio if tdm.unify_steps else None, **ema)
    trainer = TDMTrainer(backend, {"class_labels": torch.arange(NUM_CLASSES)}, config)
    trainer.train(progress=progress, on_step=on_step)
    trainer.backend.model.eval()
    return trainer


def run_digits_demo(cfg: DigitsDemoConfig | None = None, output_dir: str | Path = "outputs/digits",
                    log: Callable[[str], None] = print) -> dict:
    cfg = cfg or DigitsDemoConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher()
    started = time.perf_counter()
    log(f"TDM: distilling the digits teacher into a 4-step student ({cfg.iterations} iterations)")
    student = distil_student(teacher, cfg, out / "tdm", cfg.tdm(), cfg.iterations)
    log(f"TDM-unify: a student told K, for {', '.join(map(str, cfg.unify_steps))} steps "
        f"({cfg.unify_iterations} iterations)")
    unify = distil_student(teacher, cfg, out / "tdm_unify",
                           cfg.tdm(unify_steps=tuple(cfg.unify_steps), unify_weights=cfg.unify_weights),
                           cfg.unify_iterations)
    training_seconds = time.perf_counter() - started

    # the table measures the students as saved (LoRA files, and the unify student's K condition)
    students = {name: load_student(trainer.output_dir / DIFFUSERS_FILE, teacher)
                for name, trainer in (("tdm", student), ("tdm-unify", unify))}
    rows, samples = evaluate(teacher, students, cfg)
    results = {"rows": rows, "training_seconds": training_seconds, "eval_samples": cfg.eval_samples,
               "guidance_scale": cfg.guidance_scale, "config": {k: v for k, v in vars(cfg).items()}}
    atomic.write_text(out / "metrics.json", json.dumps(results, indent=2))
    _samples_png(samples[("teacher-ddim", cfg.teacher_steps)], samples[("tdm", 4)], out / "samples.png",
                 f"teacher {cfg.teacher_steps} steps", "TDM student 4 steps")
    log("")
    log(format_table(rows))
    log(f"\ntraining {training_seconds:.0f}s; wrote {out / 'samples.png'}, {out / 'metrics.json'}, "
        f"student LoRAs in {out / 'tdm'} and {out / 'tdm_unify'}")
    return results


@dataclass(frozen=True)
class Sampling:
    """A student row sampled off the uniform grid: its timesteps, and for a TDM-unify student the
    K whose condition c_K is applied (None: the number of timesteps)."""

    grid: tuple[int, ...]
    condition: int | None = None


def evaluate(teacher, students: dict, cfg: DigitsDemoConfig, student_steps=(4, 2, 1),
             teacher_rows: bool = True) -> tuple[list[dict], dict]:
    """The metrics.json rows: teacher DDIM (50 and 4 steps, CFG), teacher DPM-Solver++ (4 steps, CFG),
    and every student at 4, 2 and 1 steps, all on the same noise and classes. ``students`` maps a
    method name to ``f(x_t, t, labels) -> x0``; a :class:`DigitsStudent` with a TDM-unify K
    condition is sampled with the condition of the K of each row. An entry of ``student_steps``
    is a step count K (K steps on K's uniform grid, the one it is trained on) or a
    :class:`Sampling` (its rows also carry ``grid`` and ``condition``)."""
    classifier = load_classifier()
    images, _ = load_digits_tensors()
    backend = DigitsBackend(teacher, SCHEDULER_CONFIG, NULL_CLASS)
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    labels = _labels(cfg.eval_samples)
    noise = torch.randn(cfg.eval_samples, 1, 8, 8, generator=gen)
    teacher_x0 = _teacher_x0(backend, teacher, cfg.guidance_scale)
    rows, samples = [], {}
    with torch.no_grad():
        reference = classifier.features(images)

    def row(method, steps, nfe, sample_fn, key=None, **extra):
        with torch.inference_mode():
            start = time.perf_counter()
            # chunks of 500 samples: the small UNet runs ~35% faster than on one batch of 2000 (x2 for CFG)
            x = torch.cat([sample_fn(chunk) for chunk in torch.arange(cfg.eval_samples).split(500)])
            seconds = time.perf_counter() - start
        samples[key or (method, steps)] = x
        rows.append({"method": method, "steps": steps, "nfe": nfe, **extra,
                     **digits_quality(x, labels, classifier, reference), "seconds": seconds})

    for steps in (cfg.teacher_steps, 4) if teacher_rows else ():
        row("teacher-ddim", steps, 2 * steps,
            lambda c: tdm_sample(lambda x, t: teacher_x0(x, t, labels[c]), noise[c], tdm_timesteps(steps, 1000),
                                 backend.schedule))
    if teacher_rows:
        row("teacher-dpmsolver++", 4, 8, lambda c: _dpmsolver(teacher, backend, noise[c], labels[c], 4,
                                                              cfg.guidance_scale))
    for name, student_x0 in students.items():
        for plan in student_steps:
            custom = isinstance(plan, Sampling)
            grid = list(plan.grid) if custom else tdm_timesteps(plan, 900)
            condition = (plan.condition or len(grid)) if custom else plan
            extra = {"grid": grid, "condition": condition} if custom else {}
            sampling = getattr(student_x0, "sampling", None)
            with sampling(condition) if sampling is not None else contextlib.nullcontext():
                row(name, len(grid), len(grid), lambda c: tdm_sample(lambda x, t: student_x0(x, t, labels[c]),
                                                                    noise[c], grid, backend.schedule),
                    key=(name, plan) if custom else None, **extra)
    return rows, samples


def format_table(rows: list[dict]) -> str:
    lines = ["| method | steps | NFE | FID (digits) | class accuracy | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['class_accuracy']:.3f} | "
                     f"{r['seconds']:.2f} |")
    return "\n".join(lines)


def _samples_png(top: torch.Tensor, bottom: torch.Tensor, path: Path, top_title: str, bottom_title: str,
                 per_row: int = 20, scale: int = 4) -> None:
    """Two blocks of the same seeds and classes (0-9 repeating), top and bottom, upscaled."""
    from PIL import Image, ImageDraw

    def block(x):
        x = ((x[: 2 * per_row].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
        x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        rows = [torch.cat(list(x[i * per_row:(i + 1) * per_row]), dim=1) for i in range(2)]
        return torch.cat(rows, dim=0)

    a, b = block(top), block(bottom)
    width, margin = a.shape[1], 14
    canvas = Image.new("L", (width, 2 * a.shape[0] + 2 * margin + 4), 255)
    canvas.paste(Image.fromarray(a.numpy()), (0, margin))
    canvas.paste(Image.fromarray(b.numpy()), (0, 2 * margin + a.shape[0] + 4))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), top_title, fill=0)
    draw.text((2, margin + a.shape[0] + 4), bottom_title, fill=0)
    with atomic.atomic_path(path) as tmp:
        canvas.save(tmp)


class DigitsStudent:
    """A saved digits student: ``f(x_t, t, labels) -> x0``. A TDM-unify student also carries its K
    condition (``conditions``, lora/step_embedding.py); sample it for K inside ``sampling(K)``
    (a K it was not trained for is refused). A fixed-K student's ``sampling`` does nothing."""

    def __init__(self, unet, conditions=None):
        self.backend = DigitsBackend(unet, SCHEDULER_CONFIG, NULL_CLASS)
        self.conditions = conditions

    def __call__(self, x, t, labels):
        return self.backend.x0(x, t, {"class_labels": labels})

    def sampling(self, num_steps: int):
        from ...lora.step_embedding import applied

        return applied(self.backend.model, self.conditions, num_steps)

    def sample(self, noise: torch.Tensor, labels: torch.Tensor, num_steps: int) -> torch.Tensor:
        """``num_steps`` TDM steps on that K's uniform grid (the one it was trained on)."""
        with torch.no_grad(), self.sampling(num_steps):
            return tdm_sample(lambda x, t: self(x, t, labels), noise, tdm_timesteps(num_steps, 900), self.backend.schedule)


def load_student(lora_file: str | Path, teacher=None) -> DigitsStudent:
    """A saved student: the shipped teacher plus the LoRA of ``pytorch_lora_weights.safetensors``
    (read with its own adapter metadata: rank, alpha, targets) and, for a TDM-unify student, its K
    condition. Returns a :class:`DigitsStudent`, f(x_t, t, labels) -> x0."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.functional import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ...lora.step_embedding import StepConditions, without_step_condition

    lora_file = Path(lora_file)
    with safe_open(str(lora_file), "pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    config = LoraConfig(r=meta["unet.r"], lora_alpha=meta["unet.lora_alpha"], target_modules=meta["unet.target_modules"])
    unet = copy.deepcopy(teacher if teacher is not None else load_teacher())
    inject_adapter_in_model(config, unet, adapter_name="student")
    tensors = load_file(str(lora_file))
    state = {k.removeprefix("unet."): v for k, v in without_step_condition(tensors).items()}
    result = set_peft_model_state_dict(unet, state, adapter_name="student")
    if result.unexpected_keys:
        raise ValueError(f"{lora_file}: keys that fit no module of the digits teacher: {result.unexpected_keys[:5]}")
    return DigitsStudent(unet.eval(), StepConditions.read(lora_file))
