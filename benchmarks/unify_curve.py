"""Would a longer run reach the digits TDM-unify targets? FID of the unify student as it would be
saved every few iterations, raw and as an EMA of its weights, beside the fixed 4-step student.

    .venv/bin/python benchmarks/unify_curve.py [--iterations 600] [--every 100] [--ema 0.98]
        [--trainer_ema 0.9999] [--generator_lr_ratio 0.4] [--fixed_generator_lr_ratio 0.2]
        [--step_embedding_lr_ratio 3] [--unify_weights 0.2 0.4 0.4] [--unify_batch_size 64] [--seed 0]
        [--eval_samples 1000]

The README main job trains the unify student (K in {1, 2, 4}) for 200 iterations, inside a 5-minute
budget; issue 12 asks it for <= 0.8x the fixed 4-step student's FID at 1 and 2 steps and <= 1.15x at
4 steps. This trains the fixed student (250 iterations) and one unify student for ``--iterations``
with the same recipe (``--generator_lr_ratio`` applies to both unless ``--fixed_generator_lr_ratio``
gives the fixed student its own), writes the unify student's LoRA every ``--every`` iterations (its
weights as trained, and the EMA of every ``--ema`` decay: LoRA and K embedding, updated after each
iteration; with ``--trainer_ema D`` also the trainer's own EMA, ``use_ema`` with decay D, as
``python -m tdm_train --use_ema`` keeps it), measures every file as saved on the same noise and
classes, and prints FID at 4, 2 and 1 steps per iteration with the three ratios to the fixed
student (``*`` marks a ratio that meets its target), and the mean pixel value of each file's 1-step
samples as sampled (the dataset's is -0.389), with the correlation of that mean with the 1-step FID
over the files. 4-6 minutes per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tdm_train.demos.digits.distill import DigitsDemoConfig, distil_student, evaluate, load_student  # noqa: E402
from tdm_train.demos.digits.teacher import load_teacher  # noqa: E402
from tdm_train.lora.export import DIFFUSERS_FILE  # noqa: E402

STEPS = (4, 2, 1)
TARGETS = {4: 1.15, 2: 0.8, 1: 0.8}  # issue 12: unify FID / fixed student's FID, per step count


class Snapshots:
    """``on_step`` hook: every ``every`` iterations, the unify student's LoRA files as trained
    (``<root>/<step>/raw``) and with the EMA weights of each decay (``<root>/<step>/ema<decay>``)."""

    def __init__(self, root: Path, every: int, decays: list[float]):
        self.root, self.every, self.decays = root, every, decays
        self.averages: dict[float, list[torch.Tensor]] = {}
        self.saved: list[tuple[int, str, Path]] = []  # (iteration, weights, diffusers file)

    def __call__(self, trainer) -> None:
        parameters = trainer.student_parameters()
        with torch.no_grad():
            for decay in self.decays:
                if decay not in self.averages:
                    self.averages[decay] = [p.detach().clone() for p in parameters]
                else:
                    for average, p in zip(self.averages[decay], parameters):
                        average.lerp_(p, 1 - decay)
        if trainer.step % self.every:
            return
        self._export(trainer, "raw")
        if trainer.ema is not None:
            self._export(trainer, "trainer-ema")
        for decay, average in self.averages.items():
            with _swapped(parameters, average):
                self._export(trainer, f"ema{decay:g}")

    def _export(self, trainer, weights: str) -> None:
        final_dir, trainer.output_dir = trainer.output_dir, self.root / str(trainer.step) / weights
        try:
            diffusers_file, _ = trainer.export_lora(ema=weights == "trainer-ema")
        finally:
            trainer.output_dir = final_dir
        self.saved.append((trainer.step, weights, diffusers_file))


@contextlib.contextmanager
def _swapped(parameters, values):
    """Within the block the parameters hold ``values``; afterwards both hold their own again."""

    def swap():
        with torch.no_grad():
            for p, v in zip(parameters, values):
                held = p.detach().clone()
                p.copy_(v)
                v.copy_(held)

    swap()
    try:
        yield
    finally:
        swap()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600, help="unify iterations (default 600; main job 200)")
    parser.add_argument("--every", type=int, default=100, help="save and measure every N iterations")
    parser.add_argument("--ema", type=float, nargs="*", default=[0.98], help="EMA decays of the student's weights")
    parser.add_argument("--trainer_ema", type=float, default=None, metavar="DECAY",
                        help="train the unify student with the trainer's EMA (use_ema) of this decay")
    parser.add_argument("--generator_lr_ratio", type=float, default=0.4,
                        help="student lr / fake-score lr, both students (default 0.4; main job 0.2)")
    parser.add_argument("--fixed_generator_lr_ratio", type=float, default=None,
                        help="the fixed student's own ratio (default --generator_lr_ratio; main job 0.2)")
    parser.add_argument("--step_embedding_lr_ratio", type=float, default=3.0,
                        help="unify K-embedding lr / generator lr (default 3; main job 10)")
    parser.add_argument("--unify_weights", type=float, nargs=3, default=None, metavar=("W1", "W2", "W4"),
                        help="how often K = 1, 2, 4 is drawn (default uniform)")
    parser.add_argument("--unify_batch_size", type=int, default=None,
                        help="the unify student's batch (default the fixed student's, 64)")
    parser.add_argument("--fixed_iterations", type=int, default=250,
                        help="fixed 4-step student's iterations (default 250, the main job's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_samples", type=int, default=1000)
    args = parser.parse_args()
    if args.every < 1 or args.iterations < args.every:
        parser.error("--every must be >= 1 and <= --iterations")
    if any(not 0 < d < 1 for d in args.ema + ([args.trainer_ema] if args.trainer_ema is not None else [])):
        parser.error("--ema decays must lie in (0, 1)")

    cfg = DigitsDemoConfig(seed=args.seed, iterations=args.fixed_iterations, eval_samples=args.eval_samples,
                           generator_lr_ratio=args.generator_lr_ratio,
                           step_embedding_lr_ratio=args.step_embedding_lr_ratio,
                           unify_weights=tuple(args.unify_weights) if args.unify_weights else None)
    teacher = load_teacher()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fixed_ratio = args.generator_lr_ratio if args.fixed_generator_lr_ratio is None else args.fixed_generator_lr_ratio
        fixed = distil_student(teacher, dataclasses.replace(cfg, generator_lr_ratio=fixed_ratio), Path(tmp) / "tdm",
                               cfg.tdm(), cfg.iterations, progress=False)
        snapshots = Snapshots(Path(tmp) / "unify", args.every, args.ema)
        unify_cfg = dataclasses.replace(cfg, batch_size=args.unify_batch_size or cfg.batch_size)
        distil_student(teacher, unify_cfg, Path(tmp) / "unify" / "final",
                       cfg.tdm(unify_steps=tuple(cfg.unify_steps), unify_weights=cfg.unify_weights),
                       args.iterations, progress=False, on_step=snapshots, ema_decay=args.trainer_ema)
        training = time.perf_counter() - started
        students = {"tdm": load_student(fixed.output_dir / DIFFUSERS_FILE, teacher)}
        students.update({(step, weights): load_student(path, teacher) for step, weights, path in snapshots.saved})
        rows, _ = evaluate(teacher, students, cfg, student_steps=STEPS, teacher_rows=False)
    fid = {(r["method"], r["steps"]): r["fid"] for r in rows}
    one_step_mean = {r["method"]: r["pixel_mean"] for r in rows if r["steps"] == 1}

    draws = " / ".join(f"{w:g}" for w in args.unify_weights) if args.unify_weights else "uniform"
    print(f"digits FID (lower is better), seed {args.seed}, {args.eval_samples} samples per cell; generator lr ratio "
          f"{args.generator_lr_ratio:g}, K-embedding lr ratio {args.step_embedding_lr_ratio:g}, K weights {draws}, "
          f"unify batch {unify_cfg.batch_size}; "
          f"training {training:.0f} s\n")
    print(f"fixed 4-step student ({cfg.iterations} iterations, generator lr ratio {fixed_ratio:g}): "
          + ", ".join(f"{fid[('tdm', k)]:.1f} at {k}" for k in STEPS)
          + f"; 1-step pixel mean {one_step_mean['tdm']:.3f}\n")
    print("| unify iterations | weights | " + " | ".join(f"@{k}" for k in STEPS) + " | "
          + " | ".join(f"/tdm @{k} (<= {TARGETS[k]:g})" for k in STEPS) + " | @1 pixel mean |")
    print("|---:|---|" + "---:|" * (2 * len(STEPS) + 1))
    for step, weights, _ in snapshots.saved:
        values = [fid[((step, weights), k)] for k in STEPS]
        ratios = [v / fid[("tdm", k)] for v, k in zip(values, STEPS)]
        print(f"| {step} | {weights} | " + " | ".join(f"{v:.1f}" for v in values) + " | "
              + " | ".join(f"{r:.2f}{'*' if r <= TARGETS[k] else ''}" for r, k in zip(ratios, STEPS))
              + f" | {one_step_mean[(step, weights)]:.3f} |")
    if len(snapshots.saved) > 2:
        keys = [(step, weights) for step, weights, _ in snapshots.saved]
        r = pearson([fid[(key, 1)] for key in keys], [one_step_mean[key] for key in keys])
        print(f"\ncorrelation of the 1-step FID with the 1-step pixel mean over the {len(keys)} files: r = {r:.2f}")
    return 0


def pearson(a: list[float], b: list[float]) -> float:
    """Pearson's r of two equally long lists (torch.corrcoef, in float64)."""
    return float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])


if __name__ == "__main__":
    raise SystemExit(main())
