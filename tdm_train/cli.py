"""`python -m tdm_train`: the embedded demo with no arguments; TDM distillation of a real SDXL,
PixArt-alpha or CogVideoX-2B teacher with --pretrained_teacher_model (diffusers flag names), from
flags and/or a TOML/YAML/JSON config file whose keys are the flag names (flags win)."""

from __future__ import annotations

import argparse

from .errors import BadInput, run_cli
from .training.arguments import build_parser, parse_args, tdm_config  # noqa: F401  (build_parser: the public parser)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo == "digits":
        from .demos.digits.distill import run_digits_demo

        run_digits_demo(digits_config(args), output_dir=args.output_dir or "outputs/digits")
        return 0

    from .demos.gmm_distill import GMMDemoConfig, run_gmm_demo

    if args.generator_step_weighting != "none":
        raise BadInput("--generator_step_weighting: the Gaussian-mixture toy's students are EDM-preconditioned x0 "
                       "MLPs, not networks of a prediction type whose output gain the weighting reads; use it "
                       "with the digits demo or a teacher")
    tdm = tdm_config(args)
    cfg = GMMDemoConfig(seed=args.seed, iterations=args.iterations or 500, prefit_iterations=args.prefit_iterations,
                        batch_size=args.batch_size or 512, eval_samples=args.eval_samples or 4000, tdm=tdm,
                        schedule=args.schedule, flow_shift=args.flow_shift)
    schedule = f"rectified flow, shift {cfg.flow_shift:g}" if cfg.schedule == "flow" else "DDPM (SDXL betas)"
    print(f"TDM demo: 2-D mixture of {cfg.num_modes} Gaussians, exact teacher, {schedule}, grid {tdm.grid()}",
          flush=True)
    default_out = "outputs/gmm_flow_demo" if cfg.schedule == "flow" else "outputs/gmm_demo"
    run_gmm_demo(cfg, output_dir=args.output_dir or default_out)
    return 0


def digits_config(args: argparse.Namespace):
    """The digits demo's settings from the flags: TDM's choices (--loss, --tau_mode, --mid_point,
    --no_importance_weight, --generator_step_weighting), --real_guidance_scale and --generator_lr_ratio
    apply to both of its students; its grids are fixed (a 4-step student and a unify student for 1, 2
    and 4 steps), so --num_steps / --total_steps are refused rather than ignored."""
    from .demos.digits.distill import DigitsDemoConfig

    if args.num_steps != 4 or args.total_steps not in (None, 900):
        raise BadInput("--num_steps / --total_steps: the digits demo trains a 4-step student on 899/674/449/224 and "
                       "a TDM-unify student for 1, 2 and 4 steps on their uniform grids; another grid needs "
                       "--demo gmm or --pretrained_teacher_model")
    defaults = DigitsDemoConfig()
    guidance = args.real_guidance_scale if args.real_guidance_scale is not None else defaults.guidance_scale
    if not args.generator_lr_ratio > 0:
        raise BadInput(f"--generator_lr_ratio {args.generator_lr_ratio}: a number > 0")
    cfg = DigitsDemoConfig(seed=args.seed, iterations=args.iterations or defaults.iterations,
                           batch_size=args.batch_size or defaults.batch_size,
                           eval_samples=args.eval_samples or defaults.eval_samples, guidance_scale=guidance,
                           generator_lr_ratio=args.generator_lr_ratio, generator_loss=args.loss,
                           tau_mode=args.tau_mode, mid_point=args.mid_point,
                           importance_weighting=not args.no_importance_weight,
                           generator_step_weighting=args.generator_step_weighting)
    try:
        cfg.tdm()
    except ValueError as error:
        raise BadInput(f"--real_guidance_scale {guidance}: {error}") from None
    return cfg


def run_training(args: argparse.Namespace) -> int:
    from .training.run import train_from_args

    train_from_args(args)
    return 0


def _main(argv: list[str] | None) -> int:
    from .training import preflight

    args = parse_args(argv)
    if args.pretrained_teacher_model:
        return run_training(args)
    if args.config or args.prompts:
        raise BadInput("training needs --pretrained_teacher_model (in the flags or the --config file)")
    preflight.check_values(args, training=False)
    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: tdm_train/errors.py (2 bad input, 3 incompatible file, 4 output refused, 6 stopped on NaN)."""
    return run_cli(_main, argv)
