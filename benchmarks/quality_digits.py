"""The digits quality table, recomputed from the students `python -m tdm_train` saved.

    .venv/bin/python benchmarks/quality_digits.py [--students outputs/digits] [--eval_samples 2000]

Rows (same noise and classes for all; FID of the digits classifier's features against the whole
dataset; class accuracy = share of samples classified as their prompt): the teacher with DDIM at
50 and 4 steps and DPM-Solver++ at 4 steps (CFG), the TDM student and the TDM-unify student at 4, 2
and 1 steps (one network evaluation per step, no CFG). The TDM-unify student is read with its K
condition (the c_K its files carry) and sampled with the c_K of each row's K.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tdm_train.demos.digits.distill import DigitsDemoConfig, evaluate, format_table, load_student  # noqa: E402
from tdm_train.demos.digits.teacher import load_teacher  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="outputs/digits", help="the output_dir of python -m tdm_train")
    parser.add_argument("--eval_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
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
    rows, _ = evaluate(teacher, students, cfg)
    print(f"{args.eval_samples} samples per row, CFG {cfg.guidance_scale} for the teacher rows\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
