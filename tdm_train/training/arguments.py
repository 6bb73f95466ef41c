"""The flags of `python -m tdm_train` (diffusers flag names) and config files whose keys are the
flag names (TOML/YAML/JSON; flags win), turned into a parsed namespace and a TDMConfig."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..distill import TDMConfig
from ..errors import BadInput
from ..recipes import default_total_steps, recommended_guidance


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(float(item)) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tdm_train",
        description="TDM (Trajectory Distribution Matching) few-step distillation. With no arguments: the "
                    "embedded digits demo (a real teacher trained on scikit-learn's digits, distilled on the CPU). "
                    "With --pretrained_teacher_model: distil a diffusers "
                    "SDXL, PixArt-alpha or CogVideoX-2B pipeline folder into a K-step student LoRA, data-free.",
    )
    common = parser.add_argument_group("common")
    common.add_argument("--output_dir", "--output-dir", default=None,
                        help="where results go (defaults: outputs/digits, outputs/gmm_demo, outputs/tdm)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--num_steps", "--num-steps", type=int, default=4, help="student steps K (default 4)")
    common.add_argument("--total_steps", "--total-steps", type=int, default=None,
                        help="span T_s of the uniform grid t_k = k*T_s//K - 1 (default 900: 899/674/449/224; "
                             "1000 on flow schedules, SD3 and the flow toy: 999/749/499/249)")
    common.add_argument("--tau_mode", "--tau-mode", choices=("separate", "tail"), default="separate",
                        help="separate: tau in the step's own interval (default); tail: up to T_s")
    common.add_argument("--mid_point", "--mid-point", choices=("grid", "demo"), default="grid",
                        help="level the step lands on: the next grid point (default) or the demo's t_k - (T_s/K - 1)")
    common.add_argument("--loss", "--generator-loss", dest="loss", choices=("mse", "huber_elementwise", "pseudo_huber"),
                        default="mse", help="generator loss (default mse; demo huber_elementwise; paper pseudo_huber)")
    common.add_argument("--no_importance_weight", "--no-importance-weight", action="store_true",
                        help="drop the demo's importance weight on the fake-score loss")
    common.add_argument("--generator_step_weighting", "--generator-step-weighting", choices=("none", "output_gain"),
                        default="none",
                        help="none (default: the paper and the demo): every sample's generator loss counts alike, so "
                             "the noisiest step, whose x0 moves 60x with the network's output at t = 899, dominates "
                             "the update; output_gain (ours): each sample weighted by 1 / that gain, so that every "
                             "step moves the network alike")

    demo = parser.add_argument_group("the embedded demos (no --pretrained_teacher_model)")
    demo.add_argument("--demo", choices=("digits", "gmm"), default="digits",
                      help="digits (default): the digits teacher, TDM and TDM-unify students, FID table (both "
                           "students follow --loss, --tau_mode, --mid_point, --no_importance_weight, --generator_step_weighting, "
                           "--real_guidance_scale, default 2, and --generator_lr_ratio); gmm: the "
                           "2-D Gaussian-mixture toy with an exact teacher")
    demo.add_argument("--iterations", type=int, default=None, help="TDM iterations (digits default 250, gmm 500)")
    demo.add_argument("--prefit-iterations", "--prefit_iterations", dest="prefit_iterations", type=int, default=3000,
                      help="iterations fitting the network to the teacher first (default 3000)")
    demo.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                      help="(digits default 64, gmm 512)")
    demo.add_argument("--eval-samples", "--eval_samples", dest="eval_samples", type=int, default=None,
                      help="samples scored per row (digits default 2000, gmm 4000)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.add_argument("--schedule", choices=("ddpm", "flow"), default="ddpm",
                      help="gmm: the noise schedule, ddpm (SDXL's betas, default) or flow (rectified flow, SD3's "
                           "shifted sigmas; the grid then spans T_s = 1000 from pure noise unless --total_steps is given)")
    demo.add_argument("--flow_shift", "--flow-shift", type=float, default=3.0,
                      help="gmm --schedule flow: the time shift (default 3.0, SD3 / SD3.5)")

    train = parser.add_argument_group("training a real teacher")
    train.add_argument("--config", default=None, help="TOML, YAML or JSON file of flag names -> values; flags override it")
    train.add_argument("--pretrained_teacher_model", default=None, help="diffusers pipeline folder of the teacher")
    train.add_argument("--backbone", choices=("auto", "sdxl", "pixart", "cogvideox", "sd3"), default="auto",
                       help="override the backbone detected from model_index.json")
    train.add_argument("--prompts", default=None, help=".txt (one per line), .jsonl (text field) or .csv file")
    train.add_argument("--prompt_column", default=None, help="field / column of .jsonl / .csv prompts (default text, "
                                                             "prompt or caption)")
    train.add_argument("--train_batch_size", type=int, default=1, help="per process and micro-batch")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches (each with its own rollout) per update of either adapter: one step trains "
                            "on train_batch_size * this * processes samples")
    train.add_argument("--max_train_steps", type=int, default=500)
    train.add_argument("--learning_rate", type=float, default=2e-5, help="fake-score learning rate (default 2e-5)")
    train.add_argument("--generator_lr_ratio", type=float, default=0.2,
                       help="student lr = learning_rate * this (default 0.2, the demo's lr/5)")
    train.add_argument("--adam_beta1", type=float, default=0.0)
    train.add_argument("--adam_beta2", type=float, default=0.95, help="(demo 0.95; the paper reports 0.999)")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="student gradient clipping")
    train.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler name for the student")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                       help="dtype of the frozen base; LoRA weights and optimizer states stay fp32. bf16 is "
                            "recommended; fp16 adds dynamic loss scaling (one GradScaler per adapter)")
    train.add_argument("--ddp_bucket_cap_mb", type=float, default=25.0,
                       help="several processes: gradient bucket size (MB) all-reduced during backward (default 25)")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--lora_rank", type=int, default=32, help="default 32 (the authors' TDM-R1 LoRA)")
    train.add_argument("--lora_alpha", type=float, default=64.0, help="default 64 (scale alpha/rank = 2, as TDM-R1)")
    train.add_argument("--lora_target_modules", type=_csv, default=None,
                       help="comma list (default: attention to_q,to_k,to_v,to_out.0)")
    train.add_argument("--resolution", type=int, default=1024, help="image side in pixels (SDXL, PixArt)")
    train.add_argument("--height", type=int, default=480, help="video height (CogVideoX)")
    train.add_argument("--width", type=int, default=720, help="video width (CogVideoX)")
    train.add_argument("--frames", type=int, default=49, help="video frames (CogVideoX)")
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="keep the newest N >= 1 checkpoints (default: all)")
    train.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint folder, or latest (the newest complete one: a damaged checkpoint is "
                            "skipped, saying why)")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="--output_dir holds a run: remove it as a whole (checkpoints, LoRA files, history, "
                            "validation images, prompt cache) and start over. Without it such a folder is refused")
    train.add_argument("--validation_steps", type=int, default=None,
                       help="every N steps: student samples next to the teacher's (PNG, tensorboard)")
    train.add_argument("--num_validation_prompts", type=int, default=2)
    train.add_argument("--validation_teacher_steps", type=int, default=25)
    train.add_argument("--report_to", default=None, help="accelerate tracker, e.g. tensorboard")
    train.add_argument("--student_timesteps", type=_int_list, default=None,
                       help="explicit grid, noisiest first (e.g. 999,856,665,399); overrides --num_steps/--total_steps")
    train.add_argument("--real_guidance_scale", type=float, default=None,
                       help="CFG folded into the teacher's target (the student samples at cfg 1). Default: the "
                            "backbone's recipe (tdm_train/recipes.py): PixArt-alpha 4.5 (the official "
                            "demo), SDXL 8 (the paper), CogVideoX 6, SD3 7, SD3.5 4.5 (ours: the teachers' own "
                            "sampling guidance; the paper gives none). 1 = no CFG")
    train.add_argument("--huber_c", type=float, default=1e-3)
    train.add_argument("--fake_updates_per_generator", type=int, default=1, help="TTUR ratio")
    train.add_argument("--unify_steps", type=_int_list, default=None,
                       help="sampling-steps-aware training: K drawn per sample from this set (e.g. 1,2,4), each on "
                            "its uniform grid; the student and the fake score are each conditioned on K (the "
                            "student's condition is saved with its LoRA: sample it with one of these K)")
    train.add_argument("--step_embedding_lr_ratio", type=float, default=None,
                       help="with --unify_steps: lr of the student's K embedding relative to the generator lr "
                            "(default 1: the same)")
    train.add_argument("--max_nonfinite_in_a_row", type=int, default=5)
    train.add_argument("--use_ema", action="store_true",
                       help="keep an EMA of the student's weights (LoRA and K embedding) and export it, as the "
                            "official demo's --use_ema (diffusers' EMAModel; checkpoints hold both)")
    train.add_argument("--ema_decay", type=float, default=0.9999,
                       help="with --use_ema: the EMA's decay, reached through EMAModel's ramp (1 + n) / (10 + n) "
                            "(default 0.9999, EMAModel's and the demo's)")
    return parser


def _read_config(path: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--config {path}: no such file")
    formats = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
    if path.suffix not in formats:
        raise BadInput(f"--config {path}: expected .toml, .yaml/.yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as error:  # noqa: BLE001 - TOMLDecodeError, YAMLError, JSONDecodeError, UnicodeDecodeError
        detail = " ".join(str(error).split())
        raise BadInput(f"--config {path}: not valid {formats[path.suffix]} ({detail})") from None
    if not isinstance(data, dict):
        raise BadInput(f"--config {path}: expected a table of flag names -> values, got a {type(data).__name__}")
    return data


def _config_value(action: argparse.Action, key: str, value, path: str):
    """A config file's value through the same rules as its flag: the flag's type, its choices."""
    where = f"{key!r} in {path}"
    if action.nargs == 0:  # a switch such as --gradient_checkpointing
        if not isinstance(value, bool):
            raise BadInput(f"{where}: {value!r}; expected true or false")
        return action.const if value else action.default
    if value is None:
        if action.default is None:
            return None
        raise BadInput(f"{where} has no value; remove the key to keep the default ({action.default})")
    if isinstance(value, bool) or isinstance(value, (dict,)):
        raise BadInput(f"{where}: {value!r} is not a {getattr(action.type, '__name__', 'value')}")
    if isinstance(value, list):
        if action.type not in (_csv, _int_list):
            raise BadInput(f"{where}: a list ({value!r}) where one value is expected")
        value = ",".join(map(str, value))
    if action.type is None:
        value = str(value)
    else:
        if action.type is int and isinstance(value, float) and not value.is_integer():
            raise BadInput(f"{where}: {value!r} is not an integer")
        try:
            value = action.type(str(int(value)) if action.type is int and isinstance(value, float) else str(value))
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise BadInput(f"{where}: {value!r} is not a {getattr(action.type, '__name__', 'value')} ({error})") from None
    if action.choices is not None and value not in action.choices:
        raise BadInput(f"{where}: {value!r}; expected one of {', '.join(map(str, action.choices))}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, then the --config file's keys for what the flags left unset. ``_from_config``
    maps each value taken from the file to the file (for error messages)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._from_config = {}
    if args.config:
        explicit = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
        for action in parser._actions:  # the same flags, with no defaults: what the user typed
            if action.option_strings and action.dest != "help":
                kwargs = {"dest": action.dest}
                if action.nargs == 0:
                    kwargs["action"] = "store_const"
                    kwargs["const"] = action.const
                else:
                    kwargs["type"] = action.type
                explicit.add_argument(*action.option_strings, **kwargs)
        given = vars(explicit.parse_known_args(argv)[0])
        actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
        for key, value in _read_config(args.config).items():
            dest = str(key).replace("-", "_")
            if dest not in actions or dest == "config":
                raise BadInput(f"--config {args.config}: unknown setting {key!r} (use the flag names of --help)")
            if dest not in given:
                setattr(args, dest, _config_value(actions[dest], str(key), value, args.config))
                args._from_config[dest] = args.config
    if args.total_steps is None and not args.pretrained_teacher_model:  # a teacher's: tdm_config, per backbone
        args.total_steps = 1000 if args.demo == "gmm" and args.schedule == "flow" else 900
    return args


def tdm_config(args: argparse.Namespace, backbone: str | None = None) -> TDMConfig:
    """The TDM settings of the flags. ``--real_guidance_scale`` left unset (None) means the
    backbone's recommended guidance; with no backbone (the unconditional Gaussian-mixture toy) 1."""
    guidance = getattr(args, "real_guidance_scale", None)
    if guidance is None:
        guidance = recommended_guidance(backbone).scale if backbone else 1.0
    total_steps = args.total_steps if args.total_steps is not None else default_total_steps(backbone)
    return TDMConfig(
        num_steps=args.num_steps,
        total_steps=total_steps,
        timesteps=tuple(args.student_timesteps) if getattr(args, "student_timesteps", None) else None,
        tau_mode=args.tau_mode,
        mid_point=args.mid_point,
        guidance_scale=guidance,
        generator_loss=args.loss,
        huber_c=getattr(args, "huber_c", 1e-3),
        importance_weighting=not args.no_importance_weight,
        generator_step_weighting=getattr(args, "generator_step_weighting", "none"),
        unify_steps=tuple(args.unify_steps) if getattr(args, "unify_steps", None) else None,
    )
