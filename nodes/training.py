"""TDM Train LoRA: distils the MODEL as loaded (a community SDXL, SD1.5 or PixArt checkpoint)
into a few-step student LoRA from prompts alone, inside ComfyUI."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import folder_paths
from tdm_train.distill import TDMConfig
from tdm_train.training.prompts import read_prompts
from tdm_train.recipes import RECOMMENDED_GUIDANCE, default_total_steps, resolve_guidance
from tdm_train.timesteps import tdm_timesteps, validate_timesteps

from .comfy_trainer import train_in_comfyui, training_family
from .step_condition import attached, describe
from .v3_api import io, ui

CATEGORY = "training/TDM"
NO_FILE = "(none)"
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # TrainConfig's names
DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse\n"
                   "a watercolor painting of a fox in a snowy forest\n"
                   "a portrait of an old fisherman, dramatic light\n"
                   "a futuristic city at night, neon reflections on wet streets")


def prompt_files() -> list[str]:
    folder = Path(folder_paths.get_input_directory())
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PROMPT_SUFFIXES)
    return [NO_FILE, *found]


def collect_prompts(text: str, prompts_file: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if prompts_file and prompts_file != NO_FILE:
        root = Path(folder_paths.get_input_directory()).resolve()
        path = (root / prompts_file).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"TDM Train LoRA: refusing prompts file {prompts_file!r} outside {root}")
        prompts += read_prompts(path)
    if not prompts:
        raise ValueError("TDM Train LoRA: no prompts (write them one per line, or pick a prompts file from "
                         "ComfyUI's input folder)")
    return prompts


def lora_output_path(name: str) -> Path:
    """models/loras/<name>.safetensors, refusing names that leave the loras folder."""
    root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
    stem = name.strip().removesuffix(".safetensors")
    if not stem or Path(stem).is_absolute():
        raise ValueError(f"TDM Train LoRA: lora_name {name!r} must be a relative file name under {root}")
    path = (root / f"{stem}.safetensors").resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"TDM Train LoRA: refusing lora_name {name!r}: it resolves to {path}, outside {root}")
    return path


def training_folder(name: str) -> Path:
    """Checkpoints and the diffusers copy: output/tdm_training/<name> (never in models/loras)."""
    root = Path(folder_paths.get_output_directory()).resolve() / "tdm_training"
    return root / name.strip().removesuffix(".safetensors")


AUTO_CFG = 0.0  # training_cfg 0: the model family's recommended guidance, as the CLI's default


def training_guidance(training_cfg: float, family: str) -> tuple[float, str]:
    """(the teacher guidance to train with, where it comes from) for the node's ``training_cfg``:
    0 = auto, the family's recipe (tdm_train/recipes.py, the same as ``python -m
    tdm_train``); any value >= 1 wins (1 = no CFG)."""
    if training_cfg == AUTO_CFG:
        return resolve_guidance(None, family)
    if training_cfg < 1.0:
        raise ValueError(f"TDM Train LoRA: training_cfg {training_cfg:g} is below 1: use 0 for the model family's "
                         "recommended guidance, 1 for none, or a value > 1")
    return resolve_guidance(training_cfg, family)


def _auto_cfg_tooltip() -> str:
    labels = {"sdxl": "SDXL", "sd15": "SD1.x/2.x", "pixart": "PixArt-alpha", "sd3": "SD3", "sd3.5": "SD3.5"}
    presets = ", ".join(f"{label} {RECOMMENDED_GUIDANCE[name].scale:g}" for name, label in labels.items())
    return ("the teacher's guidance folded into the target (the student samples at cfg 1). 0 = auto: the model "
            f"family's recommended value ({presets}; the same as python -m tdm_train); 1 = no CFG")


def parse_grid(grid: str, num_steps: int, custom: str, total_steps: int = 900) -> tuple[int, ...]:
    if grid == "custom":
        return tuple(validate_timesteps([int(t) for t in custom.replace(" ", "").split(",") if t]))
    return tuple(tdm_timesteps(num_steps, total_steps))


def parse_unify(text: str) -> tuple[int, ...] | None:
    values = [int(v) for v in text.replace(" ", "").split(",") if v]
    return tuple(values) or None


def loss_curve(history: list[dict], size: tuple[int, int] = (640, 320)) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: generator (orange) and fake-score (blue) loss per step, each scaled to
    its own range, skipped steps marked red."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    margin = 30
    draw.rectangle([margin, margin // 2, width - 10, height - margin], outline=(180, 180, 180))
    steps = len(history)
    for key, colour in (("generator_loss", (230, 120, 20)), ("fake_loss", (40, 90, 200))):
        values = [h.get(key) for h in history]
        finite = [v for v in values if v is not None and v == v and abs(v) != float("inf")]
        if len(finite) < 2:
            continue
        low, high = min(finite), max(finite)
        span = (high - low) or 1.0
        points = [(margin + (width - 10 - margin) * i / max(1, steps - 1),
                   height - margin - (height - 1.5 * margin) * (v - low) / span)
                  for i, v in enumerate(values) if v in finite]
        draw.line(points, fill=colour, width=2)
        draw.text((margin + 4, 2 if key == "generator_loss" else 14), f"{key} {low:.3g}..{high:.3g}", fill=colour)
    for i, h in enumerate(history):
        if h.get("skipped_nonfinite"):
            x = margin + (width - 10 - margin) * i / max(1, steps - 1)
            draw.line([(x, height - margin), (x, height - margin + 6)], fill=(220, 0, 0), width=2)
    draw.text((margin, height - margin + 8), f"{steps} steps", fill=(80, 80, 80))
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


class TDMTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMTrainLoRA",
            display_name="TDM Train LoRA",
            category=CATEGORY,
            description="Distils the MODEL as loaded into a few-step TDM student LoRA from prompts alone (no "
                        "images): the teacher is the model, student and fake score are two LoRAs on it. Saves "
                        "models/loras/<lora_name>.safetensors and returns the model with the student applied.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS,
                                tooltip="one prompt per line (added to the prompts file's)"),
                io.Combo.Input("prompts_file", options=prompt_files(), default=NO_FILE,
                               tooltip=".txt / .jsonl / .csv in ComfyUI's input folder"),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="the teacher's unconditional input for the training CFG"),
                io.Int.Input("width", default=1024, min=64, max=4096, step=8),
                io.Int.Input("height", default=1024, min=64, max=4096, step=8),
                io.Int.Input("steps", default=500, min=1, max=100000),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Float.Input("generator_learning_rate", default=2e-5, min=0.0, max=1.0, step=1e-6),
                io.Float.Input("fake_learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6),
                io.Int.Input("lora_rank", default=32, min=1, max=256),
                io.Float.Input("lora_alpha", default=64.0, min=0.01, max=1024.0, step=0.5),
                io.Combo.Input("grid", options=["tdm_uniform", "custom"], default="tdm_uniform"),
                io.Int.Input("num_steps", default=4, min=1, max=8, tooltip="student steps on the uniform grid"),
                io.String.Input("custom_timesteps", default="899, 674, 449, 224"),
                io.Float.Input("training_cfg", default=AUTO_CFG, min=0.0, max=20.0, step=0.1,
                               tooltip=_auto_cfg_tooltip()),
                io.Combo.Input("loss", options=["mse", "huber_elementwise", "pseudo_huber"], default="mse"),
                io.Combo.Input("tau_mode", options=["separate", "tail"], default="separate"),
                io.String.Input("unify_steps", default="",
                                tooltip="e.g. 1,2,4: one student for several step counts (TDM-unify); empty: off"),
                # the frontend gives every "seed" a control-after-generate widget; declared, so that the
                # workflow files hold its value ("fixed": a training run is reproducible)
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
                io.Boolean.Input("gradient_checkpointing", default=False),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                               tooltip="the frozen model's compute dtype; the LoRAs train in fp32"),
                io.String.Input("lora_name", default="tdm_student"),
                io.Boolean.Input("resume", default=False,
                                 tooltip="continue the run of this lora_name from its last checkpoint"),
                io.Int.Input("checkpoint_every", default=100, min=1, max=100000),
            ],
            outputs=[io.Model.Output("student_model", display_name="model"),
                     io.LoraModel.Output("lora", display_name="lora"),
                     io.Image.Output("loss_curve", display_name="loss_curve"),
                     io.String.Output("lora_path", display_name="lora_path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, prompts, prompts_file, negative_prompt, width, height, steps, batch_size,
                generator_learning_rate, fake_learning_rate, lora_rank, lora_alpha, grid, num_steps,
                custom_timesteps, training_cfg, loss, tau_mode, unify_steps, seed, gradient_checkpointing,
                training_dtype, lora_name, resume, checkpoint_every) -> io.NodeOutput:
        from tdm_train.training.trainer import TrainConfig

        texts = collect_prompts(prompts, prompts_file)
        lora_path = lora_output_path(lora_name)
        folder = training_folder(lora_path.stem)
        existing = sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []
        if not resume and (existing or lora_path.exists()):
            what = f"checkpoints in {folder}" if existing else str(lora_path)
            raise ValueError(f"TDM Train LoRA: {what} already exist(s) for lora_name {lora_name!r}: turn resume on to "
                             "continue that run, or choose another lora_name (nothing is overwritten)")
        unify = parse_unify(unify_steps)
        family = training_family(model)
        guidance, guidance_source = training_guidance(training_cfg, family)
        span = default_total_steps(family)  # as python -m tdm_train: 1000 on SD3 / SD3.5
        tdm = TDMConfig(num_steps=num_steps, total_steps=span,
                        timesteps=None if unify else parse_grid(grid, num_steps, custom_timesteps, span),
                        tau_mode=tau_mode, guidance_scale=guidance, generator_loss=loss, unify_steps=unify)
        config = TrainConfig(output_dir=str(folder), max_train_steps=steps, train_batch_size=batch_size,
                             learning_rate=fake_learning_rate,
                             generator_lr_ratio=generator_learning_rate / fake_learning_rate, lora_rank=lora_rank,
                             lora_alpha=lora_alpha, checkpointing_steps=checkpoint_every, seed=seed,
                             resume_from_checkpoint="latest" if resume else None, tdm=tdm,
                             # fp16 turns on the trainer's loss scaling (the dtype itself is set on the patcher)
                             mixed_precision=MIXED_PRECISION[training_dtype])
        student, lora_state, history = train_in_comfyui(model, clip, texts, negative_prompt, width, height, config,
                                                         DTYPES[training_dtype], gradient_checkpointing, lora_path)
        summary = (f"{lora_path.name}: {config.max_train_steps} steps on {len(texts)} prompts, "
                   f"timesteps {list(tdm.timesteps or tdm_timesteps(max(unify or [num_steps]), span))}, "
                   f"training CFG {guidance:g} ({guidance_source}); "
                   f"non-finite steps skipped: {sum(1 for h in history if h.get('skipped_nonfinite'))}")
        if attached(student.wrappers) is not None:  # a K-conditioned TDM-unify student
            summary += "; " + describe(attached(student.wrappers))
        logging.info("TDM Train LoRA: %s", summary)
        return io.NodeOutput(student, lora_state, loss_curve(history), str(lora_path), ui=ui.PreviewText(summary))


NODES = [TDMTrainLoRA]
