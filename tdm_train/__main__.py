"""`python -m tdm_train`: run the embedded default, a TDM distillation on the CPU.

Until the digits demo lands, the default distills a small MLP student against the exact teacher
of a 2-D mixture of 8 Gaussians, prints the quality table and writes a scatter plot.
"""

from __future__ import annotations

import argparse
import sys

from .distill import TDMConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tdm_train",
        description="TDM few-step distillation. With no arguments: the embedded 2-D Gaussian-mixture demo.",
    )
    parser.add_argument("--output-dir", default="outputs/gmm_demo", help="where samples.png, metrics.json and "
                        "student.safetensors go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=500, help="TDM iterations (default: %(default)s)")
    parser.add_argument("--prefit-iterations", type=int, default=3000,
                        help="iterations fitting the network to the teacher first (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-steps", type=int, default=4, help="student steps K (default: %(default)s)")
    parser.add_argument("--total-steps", type=int, default=900, help="grid span T_s (default: %(default)s)")
    parser.add_argument("--tau-mode", choices=("separate", "tail"), default="separate")
    parser.add_argument("--mid-point", choices=("grid", "demo"), default="grid")
    parser.add_argument("--generator-loss", choices=("mse", "huber_elementwise", "pseudo_huber"), default="mse")
    parser.add_argument("--no-importance-weight", action="store_true", help="drop the demo's importance weight")
    parser.add_argument("--eval-samples", type=int, default=4000, help="samples scored per row (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .demos.gmm_distill import GMMDemoConfig, run_gmm_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    tdm = TDMConfig(
        num_steps=args.num_steps,
        total_steps=args.total_steps,
        tau_mode=args.tau_mode,
        mid_point=args.mid_point,
        generator_loss=args.generator_loss,
        importance_weighting=not args.no_importance_weight,
    )
    cfg = GMMDemoConfig(
        seed=args.seed,
        iterations=args.iterations,
        prefit_iterations=args.prefit_iterations,
        batch_size=args.batch_size,
        eval_samples=args.eval_samples,
        tdm=tdm,
    )
    print(f"TDM demo: 2-D mixture of {cfg.num_modes} Gaussians, exact teacher, grid {tdm.grid()}", flush=True)
    run_gmm_demo(cfg, output_dir=args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
