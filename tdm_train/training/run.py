"""From parsed CLI arguments to a finished TDM run: every check that can fail runs before any
model is loaded; then prompts are encoded once, the trainer runs, validation images are written."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .teachers import add_sdxl_time_ids, build_backend, cached_prompt_conditions, detect_backbone
from .arguments import tdm_config
from .prompts import read_prompts
from ..recipes import resolve_guidance
from .trainer import TDMTrainer, TrainConfig

logger = logging.getLogger("tdm_train")


def check_args(args: argparse.Namespace) -> tuple[str, list[str], TrainConfig]:
    """Validate everything without loading a model: (backbone, prompts, training config)."""
    folder = Path(args.pretrained_teacher_model)
    backbone = detect_backbone(folder) if args.backbone == "auto" else args.backbone
    if args.backbone != "auto" and not folder.is_dir():
        raise FileNotFoundError(f"--pretrained_teacher_model {folder}: no such folder")
    if not args.prompts:
        raise ValueError("--prompts is required: a .txt/.jsonl/.csv file of prompts (TDM needs no images)")
    prompts = read_prompts(args.prompts, args.prompt_column)
    if args.unify_steps and args.student_timesteps:
        raise ValueError("--unify_steps trains each K on its uniform grid: drop --student_timesteps")
    if args.student_timesteps and args.num_steps not in (4, len(args.student_timesteps)):
        raise ValueError(f"--num_steps {args.num_steps} does not match --student_timesteps "
                         f"{args.student_timesteps} ({len(args.student_timesteps)} steps); drop one of them")
    tdm = tdm_config(args, backbone)
    grid = tdm.grid()  # raises on a bad grid (out of range, not decreasing)
    if backbone == "sdxl" and args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 8")
    config = TrainConfig(
        output_dir=args.output_dir or "outputs/tdm",
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        generator_lr_ratio=args.generator_lr_ratio,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_weight_decay=args.adam_weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint,
        seed=args.seed,
        fake_updates_per_generator=args.fake_updates_per_generator,
        step_embedding_lr_ratio=getattr(args, "step_embedding_lr_ratio", None),
        max_nonfinite_in_a_row=args.max_nonfinite_in_a_row,
        ddp_bucket_cap_mb=args.ddp_bucket_cap_mb,
        tdm=tdm,
    )
    logger.info("TDM %s: %d prompts, grid %s, teacher guidance %g (%s)", backbone, len(prompts), grid,
                tdm.guidance_scale, resolve_guidance(args.real_guidance_scale, backbone)[1])
    return backbone, prompts, config


def train_from_args(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backbone, prompts, config = check_args(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=args.report_to,
                              project_dir=config.output_dir)
    folder = Path(args.pretrained_teacher_model)
    with accelerator.main_process_first():
        conditions, negative = cached_prompt_conditions(folder, backbone, prompts, Path(config.output_dir) / "cache",
                                                        device=accelerator.device)
    if backbone == "sdxl":
        conditions = add_sdxl_time_ids(conditions, args.resolution)
    backend = build_backend(folder, backbone, negative, resolution=args.resolution, height=args.height,
                            width=args.width, frames=args.frames)
    # everything drawn from here on follows --seed: the trainer's own generator does the loop's TDM draws,
    # AdapterRoles seeds the LoRA initialisation; this covers what uses the global RNGs (dropout in the
    # denoiser, anything a model does in train mode). Seeded after the prompt encoding, so a cache hit
    # and a cache miss train alike; a resume restores the checkpoint's RNG state over it.
    from accelerate.utils import set_seed

    set_seed(config.seed, device_specific=True)  # seed + process index: each process its own stream
    trainer = TDMTrainer(backend, conditions, config, accelerator)
    if args.report_to:
        accelerator.init_trackers("tdm", config={"backbone": backbone, "max_train_steps": config.max_train_steps})
    on_step = None
    if args.validation_steps:
        from .validation import Validator

        validator = Validator(trainer, folder, backbone, args.num_validation_prompts, args.validation_teacher_steps)

        def on_step(t):
            if t.step % args.validation_steps == 0 and accelerator.is_main_process:
                validator.run()
    summary = trainer.train(on_step=on_step)
    if args.report_to:
        accelerator.end_training()
    if accelerator.is_main_process:
        print(f"TDM {backbone}: {summary['step']} steps, {summary['nonfinite_total']} skipped; "
              f"student LoRA: {', '.join(summary.get('lora_files', []))}")
    return summary
