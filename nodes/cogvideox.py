"""CogVideoX-2B in ComfyUI with TDM: load a diffusers folder from models/CogVideo, apply TDM LoRAs,
encode prompts with T5, sample 4 steps on the trained grid 999/856/665/399, decode to frames that
ComfyUI's own image/video nodes save. ComfyUI 0.3.x has no CogVideoX model; these nodes are
backed by diffusers through tdm_train.pipelines.cogvideox, with ComfyUI's memory management
(each part is a ModelPatcher that ComfyUI loads and offloads)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import folder_paths
from tdm_train.lora.step_embedding import StepConditions, condition_target, applied
from tdm_train.timesteps import COGVIDEOX_TIMESTEPS, tdm_timesteps, validate_timesteps

from .v3_api import io, ui

CATEGORY = "TDM/CogVideoX"
FOLDER = "CogVideo"
Pipeline = io.Custom("TDM_COGVIDEOX")
Embeds = io.Custom("TDM_COGVIDEOX_EMBEDS")


def register_folder() -> None:
    folder_paths.add_model_folder_path(FOLDER, str(Path(folder_paths.models_dir) / FOLDER))


def model_folders() -> list[str]:
    """Subfolders of models/CogVideo that hold a diffusers pipeline (model_index.json)."""
    register_folder()
    names = []
    for root in folder_paths.get_folder_paths(FOLDER):
        base = Path(root)
        if base.is_dir():
            names += [str(p.parent.relative_to(base)) for p in base.rglob("model_index.json")]
    return sorted(set(names))


class _Held(torch.nn.Module):
    """A diffusers module inside a ModelPatcher (diffusers' read-only ``device`` would clash with
    the patcher's bookkeeping)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


@dataclass(frozen=True)
class ComfyCogVideoX:
    """The pipeline parts and the patchers ComfyUI moves them with; a TDM-unify LoRA's step
    condition (c_K per trained K, added to the transformer's time embedding while sampling)."""

    parts: object  # tdm_train.pipelines.cogvideox.CogVideoXParts
    patchers: dict
    step_condition: StepConditions | None = None
    step_condition_source: str = ""

    def load(self, *names: str) -> torch.device:
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patchers[n] for n in names], force_full_load=True)
        return self.patchers[names[0]].load_device


class TDMCogVideoXLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXLoader",
            display_name="TDM CogVideoX Loader",
            category=CATEGORY,
            description="Loads a CogVideoX diffusers folder (transformer, VAE, T5, tokenizer, scheduler config) from "
                        "models/CogVideo for TDM few-step sampling.",
            inputs=[
                io.Combo.Input("model", options=model_folders(), tooltip="a folder under models/CogVideo"),
                io.Combo.Input("dtype", options=["bf16", "fp16", "fp32"], default="bf16"),
            ],
            outputs=[Pipeline.Output("pipeline", display_name="pipeline")],
        )

    @classmethod
    def execute(cls, model, dtype) -> io.NodeOutput:
        import comfy.model_management
        import comfy.model_patcher
        from tdm_train.pipelines.cogvideox import CogVideoXParts, model_name

        register_folder()
        folder = _folder_path(model)
        parts = CogVideoXParts.load(folder, dtype)
        load, offload = comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
        patchers = {name: comfy.model_patcher.ModelPatcher(_Held(module), load_device=load, offload_device=offload)
                    for name, module in (("transformer", parts.transformer), ("vae", parts.vae),
                                         ("text_encoder", parts.text_encoder))}
        text = f"{model}: {model_name(parts.transformer)}, {dtype}"
        if parts.rotary:
            text += " (rotary position embeddings: TDM sampling here supports CogVideoX-2B)"
        return io.NodeOutput(ComfyCogVideoX(parts, patchers), ui=ui.PreviewText(text))


def _folder_path(name: str) -> Path:
    """models/CogVideo/<name>, refusing names that leave the registered folders."""
    for root in folder_paths.get_folder_paths(FOLDER):
        base = Path(root).resolve()
        path = (base / name).resolve()
        if path.is_relative_to(base) and (path / "model_index.json").is_file():
            return path
    raise FileNotFoundError(f"TDM CogVideoX Loader: no diffusers folder {name!r} under "
                            f"{folder_paths.get_folder_paths(FOLDER)}")


class TDMCogVideoXLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXLoRA",
            display_name="TDM CogVideoX LoRA",
            category=CATEGORY,
            description="Applies a diffusers-format LoRA (the official TDM_CogVideoX-2B_LoRA, or this pack's "
                        "trainer output) at its recorded or a manual strength, fused for speed or not; reports keys "
                        "that did not load and refuses a LoRA for another CogVideoX size.",
            inputs=[
                Pipeline.Input("pipeline"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Combo.Input("strength_source", options=["recorded", "manual"], default="recorded"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Boolean.Input("fuse", default=True, tooltip="add into the weights while sampling (faster); off: "
                                                               "low-rank forward hooks"),
            ],
            outputs=[Pipeline.Output("pipeline_out", display_name="pipeline")],
        )

    @classmethod
    def execute(cls, pipeline, lora_name, strength_source, strength, fuse) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        parts = pipeline.parts.with_lora(path, None if strength_source == "recorded" else strength, fuse)
        lines = list(parts.lora_report())
        changes = {"parts": parts}
        conditions = StepConditions.read(path)
        if conditions is not None and not _pipeline_applies_conditions(parts):
            changes.update(step_condition=with_step_condition(pipeline, conditions, lora_name),
                           step_condition_source=lora_name)
            lines.append(f"{lora_name}: TDM-unify student for K = {', '.join(map(str, conditions.steps))} steps "
                         f"(c_K on {conditions.target}): the TDM CogVideoX Sampler conditions it on its grid's "
                         "step count")
        report = "\n".join(lines)
        logging.info("TDM CogVideoX LoRA: %s", report.replace("\n", "; "))
        return io.NodeOutput(replace(pipeline, **changes), ui=ui.PreviewText(report))


def with_step_condition(pipeline: ComfyCogVideoX, conditions: StepConditions, source: str) -> StepConditions:
    """Checks a TDM-unify LoRA's step condition against the transformer (its layer, its width);
    one pipeline carries one (a second unify LoRA replaces the first, with a warning)."""
    module = condition_target(pipeline.parts.transformer, conditions.target)
    if module.out_features != conditions.dim:
        raise ValueError(f"TDM CogVideoX LoRA: {source}'s step condition has width {conditions.dim}, "
                         f"{conditions.target} of this transformer {module.out_features} (a LoRA for another size?)")
    if pipeline.step_condition is not None:
        logging.warning("TDM CogVideoX LoRA: %s replaces the step condition of %s", source,
                        pipeline.step_condition_source)
    return conditions


def _pipeline_applies_conditions(parts) -> bool:
    """Whether tdm_train's pipeline applies its LoRAs' step conditions itself (its AppliedLora
    carries them, and ``sample`` adds c_K for its grid's K): then the nodes leave it to it."""
    return any(getattr(lora, "step_conditions", None) is not None for lora in parts.loras)


def sample_video(pipeline: ComfyCogVideoX, positive, negative, grid: list[int], **kwargs) -> torch.Tensor:
    """The pipeline's sampler on ``grid``; a TDM-unify student sampled as the K = len(grid) one
    (c_K hooked on its time embedding for the call only; an untrained K is refused). Where the
    pipeline applies the condition itself (_pipeline_applies_conditions) the node's is unset."""
    conditions = pipeline.step_condition
    if conditions is not None and len(grid) not in conditions.steps:
        raise ValueError(f"TDM CogVideoX Sampler: {pipeline.step_condition_source} is a TDM-unify student trained "
                         f"for K = {conditions.steps} steps; this grid has {len(grid)} ({grid}): sample it with one "
                         f"of {conditions.steps} steps")
    with applied(pipeline.parts.transformer, conditions, len(grid)):
        return pipeline.parts.sample(positive, negative, timesteps=grid, **kwargs)


class TDMCogVideoXTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXTextEncode",
            display_name="TDM CogVideoX Text Encode",
            category=CATEGORY,
            description="T5 prompt embeddings for CogVideoX (226 tokens).",
            inputs=[Pipeline.Input("pipeline"), io.String.Input("text", multiline=True, default="")],
            outputs=[Embeds.Output("embeds", display_name="embeds")],
        )

    @classmethod
    def execute(cls, pipeline, text) -> io.NodeOutput:
        device = pipeline.load("text_encoder")
        return io.NodeOutput(pipeline.parts.encode([text], device=device).cpu())


def sampling_grid(preset: str, steps: int, custom: str) -> list[int]:
    if preset == "cogvideox":
        return list(COGVIDEOX_TIMESTEPS)
    if preset == "tdm_uniform":
        return tdm_timesteps(steps, total_steps=1000)
    return validate_timesteps([int(t) for t in custom.replace(" ", "").split(",") if t])


class TDMCogVideoXSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXSampler",
            display_name="TDM CogVideoX Sampler",
            category=CATEGORY,
            description="TDM few-step video sampling: pure noise at the first trained timestep, the trained grid "
                        "(999/856/665/399 for TDM CogVideoX-2B), the folder's v-prediction zero-terminal-SNR schedule.",
            inputs=[
                Pipeline.Input("pipeline"),
                Embeds.Input("positive"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("frames", default=49, min=1, max=1025, step=4, tooltip="4k+1"),
                io.Int.Input("width", default=720, min=16, max=4096, step=16),
                io.Int.Input("height", default=480, min=16, max=4096, step=16),
                io.Combo.Input("preset", options=["cogvideox", "tdm_uniform", "custom"], default="cogvideox"),
                io.Int.Input("steps", default=4, min=1, max=8, tooltip="tdm_uniform only"),
                io.String.Input("custom_timesteps", default="999, 856, 665, 399"),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("cfg", default=1.0, min=1.0, max=20.0, step=0.1),
                Embeds.Input("negative", optional=True),
            ],
            outputs=[io.Latent.Output("samples", display_name="LATENT")],
        )

    @classmethod
    def execute(cls, pipeline, positive, seed, frames, width, height, preset, steps, custom_timesteps, eta, cfg,
                negative=None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        grid = sampling_grid(preset, steps, custom_timesteps)
        if pipeline.parts.rotary:
            raise ValueError("TDM CogVideoX Sampler: this transformer uses rotary position embeddings "
                             "(CogVideoX-5B / 1.5); TDM sampling here supports CogVideoX-2B")
        device = pipeline.load("transformer")
        progress = comfy.utils.ProgressBar(len(grid))

        def on_step(step, x0):
            progress.update_absolute(step, len(grid))
            comfy.model_management.throw_exception_if_processing_interrupted()

        latents = sample_video(pipeline, positive, negative, grid, seed=seed, frames=frames, height=height,
                               width=width, eta=eta, cfg=cfg, callback=on_step, device=device)
        # ComfyUI's video latent layout [B, C, F, h, w]
        return io.NodeOutput({"samples": latents.permute(0, 2, 1, 3, 4).cpu()})


class TDMCogVideoXDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXDecode",
            display_name="TDM CogVideoX Decode",
            category=CATEGORY,
            description="CogVideoX VAE decode to IMAGE frames (save them with ComfyUI's video or animated-image "
                        "nodes). Tiling and slicing lower the memory.",
            inputs=[
                Pipeline.Input("pipeline"),
                io.Latent.Input("samples"),
                io.Boolean.Input("tiling", default=True),
                io.Boolean.Input("slicing", default=True),
            ],
            outputs=[io.Image.Output("frames", display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, pipeline, samples, tiling, slicing) -> io.NodeOutput:
        latents = samples["samples"]
        if latents.dim() != 5:
            raise ValueError(f"TDM CogVideoX Decode takes video latents [B, C, F, h, w], got {tuple(latents.shape)}")
        pipeline.load("vae")
        return io.NodeOutput(pipeline.parts.decode(latents.permute(0, 2, 1, 3, 4), tiling=tiling, slicing=slicing))


NODES = [TDMCogVideoXLoader, TDMCogVideoXLoRA, TDMCogVideoXTextEncode, TDMCogVideoXSampler, TDMCogVideoXDecode]
