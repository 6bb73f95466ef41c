"""The student to export: a base model (a diffusers pipeline folder, or a single-file UNet
checkpoint read by diffusers with a pipeline folder for its configs) with a TDM LoRA fused in
at its strength, plus what the runtime needs to sample it (schedule, trained timesteps)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdm_train.errors import IncompatibleFile
from tdm_train.lora.merge import fuse_lora
from tdm_train.lora.step_embedding import StepConditions, fold_into_bias
from tdm_train.training.preflight import check_weights
from tdm_train.training.teachers import PIPELINE_CLASSES, pipeline_class_name
from tdm_train.recipes import default_total_steps
from tdm_train.timesteps import COGVIDEOX_TIMESTEPS, tdm_timesteps, validate_timesteps

FAMILY_OF_PIPELINE = {**PIPELINE_CLASSES, "StableDiffusionPipeline": "sd15"}
COMPONENT = {"sdxl": "unet", "sd15": "unet", "pixart": "transformer", "cogvideox": "transformer", "sd3": "transformer"}
MODEL_CLASS = {"sdxl": "UNet2DConditionModel", "sd15": "UNet2DConditionModel",
               "pixart": "PixArtTransformer2DModel", "cogvideox": "CogVideoXTransformer3DModel",
               "sd3": "SD3Transformer2DModel"}


@dataclass
class LoadedStudent:
    family: str
    model: torch.nn.Module  # the diffusers denoiser, LoRA fused, float32, eval
    scheduler_config: dict
    timesteps: list[int]
    source: dict = field(default_factory=dict)
    num_steps: int | None = None  # a TDM-unify student: the K whose c_K is folded in
    unify_steps: list[int] | None = None  # ... and every K it was trained for


def pipeline_family(folder: Path) -> str:
    name = pipeline_class_name(folder, "--model takes a diffusers pipeline folder, or a .safetensors UNet "
                                       "checkpoint with --config pointing at its pipeline folder")
    if name not in FAMILY_OF_PIPELINE:
        raise IncompatibleFile(f"{folder} is a {name or 'unknown'} pipeline; the export supports "
                         f"{', '.join(sorted(FAMILY_OF_PIPELINE))}")
    return FAMILY_OF_PIPELINE[name]


def unify_grid(conditions: StepConditions, num_steps: int | None, timesteps: list[int] | None, metadata: dict,
               source: str) -> list[int]:
    """The grid of the K a TDM-unify student is exported for (the uniform K-grid it was trained
    on, T_s from its tdm.sampling metadata, default 900); refuses a missing or untrained K."""
    trained = ", ".join(map(str, conditions.steps))
    if num_steps is None:
        raise ValueError(f"{source} is a TDM-unify LoRA trained for K = {trained} sampling steps: an export is for "
                         f"one of them, pass --num-steps K (one of {trained})")
    try:
        conditions.vector(num_steps)
    except ValueError:
        raise ValueError(f"--num-steps {num_steps}: {source} is a TDM-unify LoRA trained for K = {trained} "
                         f"sampling steps, not {num_steps}") from None
    if timesteps is not None:
        if len(timesteps) != num_steps:
            raise ValueError(f"--timesteps lists {len(timesteps)} timesteps for --num-steps {num_steps}")
        return timesteps
    try:
        total = int(json.loads(metadata.get("tdm.sampling", "{}")).get("total_steps", 900))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        total = 900
    return tdm_timesteps(num_steps, total)


def load_student(model: str | Path, lora: str | Path | None = None, strength: float | None = None,
                 config: str | Path | None = None, timesteps: list[int] | None = None,
                 num_steps: int | None = None) -> LoadedStudent:
    """``num_steps``: for a TDM-unify LoRA (one student for several K), the K to export: its c_K
    is folded into the timestep embedding's bias, and the grid is that K's."""
    import diffusers

    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"--model {model}: no such file or folder")
    folder = model if model.is_dir() else (Path(config) if config else None)
    if folder is None:
        raise ValueError(f"{model} is a single file: pass --config with the diffusers pipeline folder of its base "
                         "model (for the component configs and the scheduler); nothing is downloaded")
    family = pipeline_family(folder)
    component = COMPONENT[family]
    cls = getattr(diffusers, MODEL_CLASS[family])
    if model.is_dir():
        if not (folder / component).is_dir():
            raise IncompatibleFile(f"{folder} lacks its {component}/ folder")
        check_weights(folder / component)
        try:
            denoiser = cls.from_pretrained(folder / component, torch_dtype=torch.float32)
        except (ValueError, OSError) as error:
            raise IncompatibleFile(f"{folder / component}: the {cls.__name__} does not load "
                                   f"({' '.join(str(error).split())[:400]})") from None
    else:
        if model.suffix != ".safetensors":
            raise ValueError(f"{model}: single-file checkpoints are read as .safetensors only (never unpickled)")
        if not hasattr(cls, "from_single_file"):
            raise ValueError(f"diffusers cannot read a single-file {cls.__name__} ({family}); use a pipeline folder")
        denoiser = cls.from_single_file(str(model), config=str(folder), subfolder=component,
                                        torch_dtype=torch.float32, local_files_only=True)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise FileNotFoundError(f"{scheduler_path} is missing: the runtime's noise schedule comes from it")
    scheduler_config = json.loads(scheduler_path.read_text())
    source = {"model": str(model.resolve()), "config": str(folder.resolve())}
    recorded = None
    conditions = None
    if lora is not None:
        fused = fuse_lora(denoiser, lora, strength)
        source["lora"] = {"file": str(Path(lora).resolve()), "strength": fused.strength,
                          "strength_source": fused.strength_source, "modules": fused.modules}
        if "tdm.timesteps" in fused.metadata:
            recorded = json.loads(fused.metadata["tdm.timesteps"])
        conditions = StepConditions.read(lora)
    if conditions is not None:
        timesteps = unify_grid(conditions, num_steps, timesteps, fused.metadata, str(lora))
        fold_into_bias(denoiser, conditions, num_steps)
        source["lora"]["step_condition"] = {"target": conditions.target, "num_steps": int(num_steps),
                                            "unify_steps": conditions.steps}
    elif num_steps is not None:
        raise ValueError(f"--num-steps {num_steps} is for TDM-unify LoRAs (one student for several step counts); "
                         f"{lora or 'the base model'} carries no step condition: give its grid with --timesteps")
    # defaults: CogVideoX's trained grid; on a flow schedule (SD3) the uniform grid from pure noise
    default = list(COGVIDEOX_TIMESTEPS) if family == "cogvideox" else tdm_timesteps(4, default_total_steps(family))
    grid = timesteps or recorded or default
    return LoadedStudent(family, denoiser.eval(), scheduler_config, validate_timesteps(grid), source,
                         int(num_steps) if conditions is not None else None,
                         conditions.steps if conditions is not None else None)


def vae_scale_factor(folder: Path) -> int:
    """Pixels per latent pixel: 2 ** (VAE levels - 1), 8 for every real SD/SDXL/PixArt/CogVideoX VAE."""
    config = folder / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text()).get("block_out_channels", [0] * 4)) - 1)


def reference_module(manifest, model: str | Path | None = None, lora: str | Path | None = None,
                     strength: float | None = None, config: str | Path | None = None) -> torch.nn.Module:
    """The float32 PyTorch wrapper the manifest was exported from, rebuilt from its recorded source
    (or the given base model / LoRA)."""
    from .families import family_spec, shapes_from_manifest

    source = manifest.source
    if model is None:
        if manifest.signature != "diffusers" or "model" not in source:
            raise ValueError("this export was made from a ComfyUI model: pass --model (and --lora) to rebuild the "
                             "PyTorch reference")
        model, config = source["model"], source.get("config")
        if "lora" in source:
            lora, strength = source["lora"]["file"], source["lora"]["strength"]
    student = load_student(model, lora, strength, config, num_steps=manifest.num_steps if lora is not None else None)
    if student.family != manifest.family:
        raise ValueError(f"--model is a {student.family} model but the export is {manifest.family}")
    return family_spec(manifest.family, student.model, shapes_from_manifest(manifest), "fp32").module
