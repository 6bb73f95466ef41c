"""The digits quality table, recomputed from the students `python -m tdm_train` saved.

    .venv/bin/python benchmarks/quality_digits.py [--students outputs/digits] [--eval_samples 2000]
    .venv/bin/python benchmarks/quality_digits.py --two_step_grids [899/449 899/374 ...]

Rows (same noise and classes for all; FID of the digits classifier's features against the whole
dataset; class accuracy = share of samples classified as their prompt): the teacher with DDIM at
50 and 4 steps and DPM-Solver++ at 4 steps (CFG), the TDM student and the TDM-unify student at 4, 2
and 1 steps (one network evaluation per step, no CFG). The TDM-unify student is read with its K
condition (the c_K its files carry) and sampled with the c_K of each row's K.

``--two_step_grids`` prints instead, per 2-step grid, the FID of the fixed student and of the unify
student with its c_2 (the condition it was trained with for 2 steps, on 899/449) and with its c_4:
how much of a 2-step FID is the grid's and how much the 2-step training's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tdm_train.demos.digits.distill import (  # noqa: E402
    DigitsDemoConfig,
    Sampling,
    evaluate,
    format_table,
    load_student,
)
from tdm_train.demos.digits.teacher import load_teacher  # noqa: E402


TWO_STEP_GRIDS = ("899/449", "899/374", "899/324", "899/274", "899/224")


def two_step_grid_table(teacher, students: dict, cfg: DigitsDemoConfig, grids) -> str:
    """Both students at 2 steps on each grid (same noise and classes); the unify student with c_2 and c_4."""
    plans = []
    for text in grids:
        grid = tuple(int(t) for t in text.split("/"))
        if len(grid) != 2:
            raise SystemExit(f"--two_step_grids: {text!r} is not a 2-step grid T1/T2")
        plans += [Sampling(grid, 2), Sampling(grid, 4)]
    rows = (evaluate(teacher, {"tdm": students["tdm"]}, cfg, student_steps=plans[::2], teacher_rows=False)[0]
            + evaluate(teacher, {"tdm-unify": students["tdm-unify"]}, cfg, student_steps=plans, teacher_rows=False)[0])
    fid = {(r["method"], tuple(r["grid"]), r["condition"]): r["fid"] for r in rows}
    lines = [f"digits FID at 2 steps (lower is better), {cfg.eval_samples} samples per cell; the unify student "
             "sampled with its c_2 and with its c_4\n",
             "| grid | tdm | tdm-unify c_2 | tdm-unify c_4 | unify c_2 / tdm |", "|---|---:|---:|---:|---:|"]
    for plan in plans[::2]:
        fixed, c2, c4 = fid[("tdm", plan.grid, 2)], fid[("tdm-unify", plan.grid, 2)], fid[("tdm-unify", plan.grid, 4)]
        lines.append(f"| {'/'.join(map(str, plan.grid))} | {fixed:.1f} | {c2:.1f} | {c4:.1f} | {c2 / fixed:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="outputs/digits", help="the output_dir of python -m tdm_train")
    parser.add_argument("--eval_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--two_step_grids", nargs="*", metavar="T1/T2", default=None,
                        help="print the 2-step grid table instead (no value: " + " ".join(TWO_STEP_GRIDS) + ")")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = Path(args.students)
    teacher = load_teacher()
    students = {}
    for name, sub in (("tdm", "tdm"), ("tdm-unify", "tdm_unify")):
        lora = folder / sub / "pytorch_lora_weights.safetensors"
        if not lora.is_file():
            raise SystemExit(f"{lora} is missing: run python -m tdm_train first (or pass --students)")
        students[name] = load_student(lora, teacher)
    cfg = DigitsDemoConfig(seed=args.seed, eval_samples=args.eval_samples)
    if args.two_step_grids is not None:
        print(two_step_grid_table(teacher, students, cfg, args.two_step_grids or TWO_STEP_GRIDS))
        return 0
    rows, _ = evaluate(teacher, students, cfg)
    print(f"{args.eval_samples} samples per row, CFG {cfg.guidance_scale} for the teacher rows\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
