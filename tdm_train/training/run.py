"""From parsed CLI arguments to a finished TDM run: every check that can fail runs before any
model is loaded; then prompts are encoded once, the trainer runs, validation images are written."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import preflight
from ..errors import BadInput, IncompatibleFile
from .teachers import add_sdxl_time_ids, build_backend, cached_prompt_conditions
from .arguments import tdm_config
from .prompts import read_prompts
from ..recipes import guidance_family, resolve_guidance
from .trainer import TDMTrainer, TrainConfig

logger = logging.getLogger("tdm_train")


def check_args(args: argparse.Namespace) -> tuple[str, list[str], TrainConfig]:
    """The one validation pass (preflight.py), without loading a model: (backbone, prompts,
    training config). Nothing on disk changes here."""
    preflight.check_values(args, training=True)
    folder = Path(args.pretrained_teacher_model)
    backbone, denoiser_config = preflight.inspect_teacher(folder, args.backbone, bool(args.validation_steps))
    problems = preflight.geometry_problems(args, backbone, denoiser_config)
    if problems:
        raise BadInput("invalid settings: " + "; ".join(problems))
    if not args.prompts:
        raise BadInput("--prompts is required: a .txt/.jsonl/.csv file of prompts (TDM needs no images)")
    prompts = read_prompts(args.prompts, args.prompt_column)
    if args.unify_steps and args.student_timesteps:
        raise BadInput("--unify_steps trains each K on its uniform grid: drop --student_timesteps")
    if args.student_timesteps and args.num_steps not in (4, len(args.student_timesteps)):
        raise BadInput(f"--num_steps {args.num_steps} does not match --student_timesteps "
                       f"{args.student_timesteps} ({len(args.student_timesteps)} steps); drop one of them")
    family = guidance_family(backbone, denoiser_config)  # SD3.5 apart from SD3: their own guidance
    try:
        tdm = tdm_config(args, family)
        grid = tdm.grid()  # raises on a bad grid (out of range, not decreasing)
    except ValueError as error:
        raise BadInput(str(error)) from None
    targets = args.lora_target_modules
    if targets:
        _check_targets(folder, backbone, denoiser_config, targets)
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
        use_ema=args.use_ema,
        ema_decay=args.ema_decay,
        ddp_bucket_cap_mb=args.ddp_bucket_cap_mb,
        tdm=tdm,
    )
    output_dir = Path(config.output_dir)
    preflight.check_output(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.resume_from_checkpoint:
        resolved = _check_resume(output_dir, args.resume_from_checkpoint, backbone, denoiser_config, config)
        if resolved is not None:  # the trainer resumes exactly this one (and does not warn about skips again)
            config = dataclasses.replace(config, resume_from_checkpoint=str(resolved))
    logger.info("TDM %s: %d prompts, grid %s, teacher guidance %g (%s)", backbone, len(prompts), grid,
                tdm.guidance_scale, resolve_guidance(args.real_guidance_scale, family)[1])
    return backbone, prompts, config


def _check_targets(folder: Path, backbone: str, denoiser_config: dict, targets: list[str]) -> None:
    """--lora_target_modules against the denoiser's module names, on an empty (meta-device) build
    from its config: no weights are read."""
    import diffusers
    from accelerate import init_empty_weights

    class_name = preflight.DENOISERS[backbone][1]
    with init_empty_weights():
        model = getattr(diffusers, class_name).from_config(denoiser_config)
    names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names if "attn" in n})[:8]
        raise BadInput(f"--lora_target_modules: {', '.join(unmatched)} match no Linear/Conv layer of the "
                       f"{class_name} in {folder} (its attention layers end in e.g. {', '.join(examples)})")


def _check_resume(output_dir: Path, resume: str, backbone: str, denoiser_config: dict,
                  config: TrainConfig) -> Path | None:
    """The checkpoint to resume (None: latest, and none yet): it exists, is complete, and is of this
    model, backbone and LoRA."""
    import json

    path = ckpt.resolve_resume(output_dir, resume, warn=logger.warning)
    if path is None:
        return None  # latest, and no checkpoint yet: a fresh start (the trainer says so)
    state = json.loads((path / "trainer_state.json").read_text())
    expected = {"backbone": backbone, "model_config": {k: v for k, v in denoiser_config.items()},
                "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
                "lora_target_modules": list(config.lora_target_modules or []),
                "unify_steps": list(config.tdm.unify_steps) if config.tdm.unify_steps else None}
    if state.get("model_config") is not None:
        keys = set(state["model_config"])  # compare what the saved model config spells out
        expected["model_config"] = {k: v for k, v in denoiser_config.items() if k in keys}
        state = {**state, "model_config": {k: v for k, v in state["model_config"].items() if k in denoiser_config}}
    differs = ckpt.differences(state, expected)
    accumulation = state.get("gradient_accumulation_steps", 1)
    if accumulation != config.gradient_accumulation_steps:
        differs.append(f"gradient_accumulation_steps {accumulation} there, {config.gradient_accumulation_steps} here")
    if ("ema" in state) != config.use_ema:  # the trainer's state holds the EMA's update count when it has one
        ema = {True: "--use_ema", False: "no EMA"}
        differs.append(f"{ema['ema' in state]} there, {ema[config.use_ema]} here")
    if not config.tdm.unify_steps and state.get("timesteps") not in (None, config.tdm.grid()):
        differs.append(f"timesteps {state['timesteps']} there, {config.tdm.grid()} here")
    if differs:
        raise IncompatibleFile(f"{path} is from another run: {'; '.join(differs)}. Resume with the settings it was "
                               "trained with, or start a fresh run (another --output_dir, or --overwrite_output_dir)")
    return path


def train_from_args(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backbone, prompts, config = check_args(args)
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        removed = preflight.remove_run(Path(config.output_dir))
        if removed:
            logger.info("--overwrite_output_dir: removed the previous run from %s (%s)", config.output_dir,
                        ", ".join(removed))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=args.report_to,
                              project_dir=config.output_dir)
    folder = Path(args.pretrained_teacher_model)
    with accelerator.main_process_first():
        try:
            conditions, negative = cached_prompt_conditions(folder, backbone, prompts,
                                                            Path(config.output_dir) / "cache", device=accelerator.device)
        except (ValueError, OSError) as error:  # a text encoder or tokenizer that does not load
            if isinstance(error, OSError) and error.errno is not None:
                raise  # disk full, permissions: errors.explain words them
            raise IncompatibleFile(f"{folder}: the text encoders do not load ({' '.join(str(error).split())[:400]})") \
                from None
    if backbone == "sdxl":
        conditions = add_sdxl_time_ids(conditions, args.resolution)
    try:
        backend = build_backend(folder, backbone, negative, resolution=args.resolution, height=args.height,
                                width=args.width, frames=args.frames)
    except (ValueError, OSError, RuntimeError) as error:  # weights that do not fit their config, ...
        raise IncompatibleFile(f"{folder}: the {backbone} denoiser does not load ({' '.join(str(error).split())[:400]})") \
            from None
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
                with t.exported_weights():  # the student as it would be saved now (its EMA with --use_ema)
                    validator.run()
    summary = trainer.train(on_step=on_step)
    if args.report_to:
        accelerator.end_training()
    if accelerator.is_main_process:
        print(f"TDM {backbone}: {summary['step']} steps, {summary['nonfinite_total']} skipped; "
              f"student LoRA: {', '.join(summary.get('lora_files', []))}")
    return summary
