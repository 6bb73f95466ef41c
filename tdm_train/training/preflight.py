"""The one validation pass of `python -m tdm_train`, before any model loads: every value in range,
the teacher folder complete and of the backbone asked for, the output folder writable and holding
no other run, a checkpoint to resume that fits this run. The same rules apply to flags and config
file keys (arguments.py routes both through the parser); each failure names the flag or key, the
value, and what is accepted."""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from .. import atomic
from ..errors import BadInput, IncompatibleFile, OutputRefused
from ..errors import read_json_object as read_json

# the denoiser of each backbone: its folder and diffusers class; the components training reads
DENOISERS = {"sdxl": ("unet", "UNet2DConditionModel"), "pixart": ("transformer", "PixArtTransformer2DModel"),
             "cogvideox": ("transformer", "CogVideoXTransformer3DModel"), "sd3": ("transformer", "SD3Transformer2DModel")}
TEXT_COMPONENTS = {"sdxl": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
                   "pixart": ("text_encoder", "tokenizer"), "cogvideox": ("text_encoder", "tokenizer"),
                   "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")}
LATENT_FACTOR = 8  # the VAE of every supported backbone downsamples by 8 (the backends assume it)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
# what a run leaves in its output folder (besides checkpoint-<step>): removed with --overwrite_output_dir;
# the final LoRA files (or a checkpoint) are what make a folder "hold a run"
FINAL_LORA_FILES = ("pytorch_lora_weights.safetensors", "tdm_lora_comfyui.safetensors")  # lora/export.py's names
RUN_FILES = (*FINAL_LORA_FILES, "README.md", "train_history.json")
RUN_FOLDERS = ("validation", "cache", "logs", "tdm")


def flag(args: argparse.Namespace, dest: str) -> str:
    """How the user gave ``dest``: ``--name`` or ``key 'name' of <config file>``."""
    source = getattr(args, "_from_config", {}).get(dest)
    return f"{dest!r} in {source}" if source else f"--{dest}"


# ----------------------------------------------------------------------------- values
def value_problems(args: argparse.Namespace, training: bool) -> list[str]:
    """Every out-of-range value, as '<flag> <value>: <what is accepted>'."""
    problems: list[str] = []

    def need(dest: str, ok, accepted: str) -> None:
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            problems.append(f"{flag(args, dest)} {_show(value)}: {accepted}")

    positive_int = lambda v: isinstance(v, int) and v >= 1  # noqa: E731
    positive = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0  # noqa: E731
    need("seed", lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer >= 0")
    need("num_steps", positive_int, "an integer >= 1 (the student's steps K)")
    need("total_steps", lambda v: isinstance(v, int) and 1 <= v <= 1000, "an integer in 1..1000 (T_s)")
    need("threads", positive_int, "an integer >= 1")
    need("iterations", positive_int, "an integer >= 1")
    need("batch_size", positive_int, "an integer >= 1")
    need("eval_samples", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2")
    need("prefit_iterations", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    need("flow_shift", positive, "a number > 0 (SD3's time shift; 1 = none)")
    if not training:
        return problems
    for dest in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "checkpoints_total_limit", "validation_steps", "num_validation_prompts", "validation_teacher_steps",
                 "fake_updates_per_generator", "max_nonfinite_in_a_row", "lora_rank"):
        need(dest, positive_int, "an integer >= 1" + (" (0 would delete every checkpoint as soon as it is "
                                                      "written; leave it unset to keep all)"
                                                      if dest == "checkpoints_total_limit" else ""))
    for dest in ("learning_rate", "generator_lr_ratio", "step_embedding_lr_ratio", "lora_alpha", "huber_c",
                 "max_grad_norm", "ddp_bucket_cap_mb"):
        need(dest, positive, "a number > 0" + (" (alpha 0 scales the LoRA to nothing: a student that is the "
                                               "teacher)" if dest == "lora_alpha" else ""))
    for dest in ("adam_beta1", "adam_beta2"):
        need(dest, lambda v: 0 <= v < 1, "a number in [0, 1)")
    need("adam_weight_decay", lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
    need("lr_warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    need("lr_scheduler", lambda v: v in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}")
    need("real_guidance_scale", lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (1 = no CFG)")
    for dest in ("resolution", "height", "width", "frames"):
        need(dest, positive_int, "a positive integer")
    for dest, what in (("unify_steps", "step counts, e.g. 1,2,4"), ("student_timesteps", "timesteps, e.g. 999,856,665,399"),
                       ("lora_target_modules", "module names, e.g. to_q,to_k,to_v,to_out.0")):
        value = getattr(args, dest, None)
        if value is not None and not value:
            problems.append(f"{flag(args, dest)} is empty: a comma list of {what}")
    steps = getattr(args, "unify_steps", None) or []
    if steps and (any(k < 1 for k in steps) or len(set(steps)) != len(steps)):
        problems.append(f"{flag(args, 'unify_steps')} {_show(steps)}: distinct step counts >= 1")
    if getattr(args, "step_embedding_lr_ratio", None) is not None and not steps:
        problems.append(f"{flag(args, 'step_embedding_lr_ratio')}: only means something with --unify_steps")
    return problems


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "''"
    return repr(value) if isinstance(value, str) else str(value)


def check_values(args: argparse.Namespace, training: bool) -> None:
    problems = value_problems(args, training)
    if problems:
        raise BadInput("invalid settings: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the teacher folder
def check_weights(folder: Path) -> None:
    """Every .safetensors file of a component opens (the header is read and its offsets checked
    against the file's size: a truncated or random-byte file fails here, naming itself)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise IncompatibleFile(f"{folder} holds no weights (no .safetensors file): download the component again")
    for path in files:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as error:  # noqa: BLE001 - SafetensorError and OSError alike
            raise IncompatibleFile(f"{path} is corrupt or truncated ({error}); download it again") from None


def inspect_teacher(folder: Path, forced: str, validation_images: bool) -> tuple[str, dict]:
    """(backbone, the denoiser's config) of a teacher folder, after checking that everything
    training reads is there and parseable. ``forced``: --backbone (auto = from model_index.json)."""
    from .teachers import BACKBONES, PIPELINE_CLASSES

    if not folder.is_dir():
        raise BadInput(f"--pretrained_teacher_model {folder}: no such folder")
    index_path = folder / "model_index.json"
    index = read_json(index_path, "the pipeline's index") if index_path.is_file() else None
    declared = PIPELINE_CLASSES.get((index or {}).get("_class_name", ""))
    if forced == "auto":
        if index is None:
            raise BadInput(f"{folder} has no model_index.json: point --pretrained_teacher_model at a diffusers "
                           f"pipeline folder (or pass --backbone {'/'.join(BACKBONES)})")
        if declared is None:
            raise IncompatibleFile(f"{folder} is a {index.get('_class_name') or 'unknown'} pipeline; TDM training "
                                   f"supports {', '.join(PIPELINE_CLASSES)} (or force one with --backbone "
                                   f"{'/'.join(BACKBONES)})")
        backbone = declared
    else:
        backbone = forced
        if declared is not None and declared != backbone:
            raise BadInput(f"--backbone {forced}, but {index_path} says {index['_class_name']} ({declared}): drop "
                           f"--backbone (auto) or point --pretrained_teacher_model at a {forced} folder")
    subfolder, class_name = DENOISERS[backbone]
    needed = [subfolder, "scheduler", *TEXT_COMPONENTS[backbone], *(("vae",) if validation_images else ())]
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise IncompatibleFile(f"{folder} lacks {', '.join(missing)}: a {backbone} teacher folder needs "
                               f"{', '.join(needed)}")
    read_json_config = lambda name, file: read_json(folder / name / file, f"the {name} config")  # noqa: E731
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise IncompatibleFile(f"{scheduler_file} is missing: the noise schedule comes from the teacher's "
                               "scheduler config")
    read_json_config("scheduler", "scheduler_config.json")
    for name in (subfolder, *(c for c in TEXT_COMPONENTS[backbone] if c.startswith("text_encoder"))):
        if not (folder / name / "config.json").is_file():
            raise IncompatibleFile(f"{folder / name / 'config.json'} is missing")
        read_json_config(name, "config.json")
        check_weights(folder / name)
    for name in TEXT_COMPONENTS[backbone]:
        if name.startswith("tokenizer"):
            for file in sorted((folder / name).glob("*.json")):
                read_json(file, f"the {name} files")
    config = read_json_config(subfolder, "config.json")
    found = config.get("_class_name")
    if found is not None and found != class_name:
        raise IncompatibleFile(f"{folder / subfolder / 'config.json'} is a {found}; a {backbone} teacher's "
                               f"{subfolder} is a {class_name}" + (" (check --backbone)" if forced != "auto" else ""))
    return backbone, config


def geometry_problems(args: argparse.Namespace, backbone: str, denoiser_config: dict) -> list[str]:
    """Sizes the backbone can take: whole latents (and patches), CogVideoX's 4k+1 frames."""
    problems = []
    patch = int(denoiser_config.get("patch_size") or 1) if backbone != "sdxl" else 1
    factor = LATENT_FACTOR * patch
    what = f"a positive multiple of {factor} (the VAE's 8" + (f" x the patch size {patch})" if patch > 1 else ")")
    sides = ("height", "width") if backbone == "cogvideox" else ("resolution",)
    for dest in sides:
        value = getattr(args, dest)
        if isinstance(value, int) and value >= 1 and value % factor:
            problems.append(f"{flag(args, dest)} {value}: {what}")
    if backbone == "cogvideox":
        compression = int(denoiser_config.get("temporal_compression_ratio", 4))
        frames = args.frames
        if isinstance(frames, int) and frames >= 1 and (frames - 1) % compression:
            low = (frames - 1) // compression * compression + 1
            problems.append(f"{flag(args, 'frames')} {frames}: CogVideoX takes {compression}k+1 frames "
                            f"(e.g. {low} or {low + compression}); {frames} would train as {low}")
    return problems


# ----------------------------------------------------------------------------- the output folder
def holds_run(output_dir: Path) -> list[str]:
    """What in ``output_dir`` belongs to a run: its checkpoints and final LoRA files."""
    from .checkpoint import CHECKPOINT_PATTERN

    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir()
                  if CHECKPOINT_PATTERN.match(p.name) or p.name in FINAL_LORA_FILES)


def check_output(output_dir: Path, resume: str | None, overwrite: bool) -> list[str]:
    """Refuses a run into a folder that holds another run, unless resuming it or told to overwrite
    it. Returns what --overwrite_output_dir will remove (nothing is removed here)."""
    atomic.check_writable_folder(output_dir, "--output_dir")
    found = holds_run(output_dir)
    if not found or resume:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise OutputRefused(f"--output_dir {output_dir} holds a run ({shown}): continue it with "
                            "--resume_from_checkpoint latest, start over with --overwrite_output_dir (removes "
                            "that run as a whole), or choose another --output_dir")
    return found


def remove_run(output_dir: Path) -> list[str]:
    """--overwrite_output_dir: the old run's checkpoints, LoRA files, card, history, validation
    images, prompt cache and logs go, all of them, so the folder never mixes two runs. Other files
    stay."""
    from .checkpoint import CHECKPOINT_PATTERN

    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else ():
        name = path.name.removesuffix(".tmp")
        if CHECKPOINT_PATTERN.match(name) or (path.is_file() and path.name in RUN_FILES) or \
                (path.is_dir() and path.name in RUN_FOLDERS):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed
