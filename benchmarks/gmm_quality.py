"""Quality of TDM students on the 2-D Gaussian-mixture demo, per TDM option, side by side.

    .venv/bin/python benchmarks/gmm_quality.py [--seeds 0 1] [--iterations 500]

Every row distils the same pre-fit network against the same exact teacher and scores 4000
samples against the data by energy distance; the ratio column divides by the teacher's own
DDIM with the same K steps, measured in the same run (lower is better; < 0.5 is TDM_SPEC's
known-good bar).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdm_train.demos.gmm_distill import GMMDemoConfig, run_gmm_demo  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402

VARIANTS = {
    "default (separate, grid mid, mse, IS on)": TDMConfig(),
    "tail tau mode": TDMConfig(tau_mode="tail"),
    "demo mid point (t_k - 224)": TDMConfig(mid_point="demo"),
    "no importance weight": TDMConfig(importance_weighting=False),
    "huber_elementwise (demo loss)": TDMConfig(generator_loss="huber_elementwise"),
    "pseudo_huber (paper loss)": TDMConfig(generator_loss="pseudo_huber"),
    "K = 2 (899, 449)": TDMConfig(num_steps=2),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()

    print("| TDM option | student energy distance | / teacher DDIM, same K | smallest mode share | TDM seconds |")
    print("|---|---:|---:|---:|---:|")
    default_runs = None
    for name, tdm in VARIANTS.items():
        runs = [
            run_gmm_demo(replace(GMMDemoConfig(seed=seed, iterations=args.iterations), tdm=tdm), log=lambda _: None)
            for seed in args.seeds
        ]
        mean = lambda key: statistics.fmean(r[key] for r in runs)  # noqa: E731
        print(
            f"| {name} | {mean('student_energy_distance'):.4f} | {mean('energy_distance_ratio'):.3f} | "
            f"{min(r['min_mode_fraction'] for r in runs):.3f} | {mean('tdm_seconds'):.1f} |",
            flush=True,
        )
        default_runs = default_runs or runs
    first = default_runs[0]
    print(
        f"\ndefault, seed {args.seeds[0]}: teacher 4-step DDIM energy distance {first['teacher_ddim_energy_distance']:.4f}; "
        f"data-vs-data noise floor {first['rows']['data (second draw, noise floor)']['energy_distance']:.4f}; "
        f"student 4 steps / same network 100 steps wall time {first['student_vs_100step_wall_time']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
