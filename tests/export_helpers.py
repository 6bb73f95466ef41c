"""Tiny pipeline folders and student LoRAs for the export tests (built offline, seconds)."""

from __future__ import annotations

import torch

from tdm_train.lora.export import save_student_lora
from tdm_train.tiny_models import save_tiny_pipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK, ALPHA = 4, 2.0
TIMESTEPS = [899, 674, 449, 224]
SIZES = ["--height", "16:32:32", "--width", "16:32:32"]  # CLI pixel ranges; the tiny VAE downsamples by 2


def random_student_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """peft-keyed LoRA weights for every attention projection of ``model`` (lora_B non-zero, so
    fusing it changes the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            state[f"{name}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=gen) * scale
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=gen) * scale
    return state


def tiny_student(folder, backbone: str, seed: int = 0):
    """(pipeline folder, LoRA dir with both files) for a tiny random ``backbone`` model."""
    from diffusers import CogVideoXTransformer3DModel, PixArtTransformer2DModel, UNet2DConditionModel

    pipeline = save_tiny_pipeline(folder / "pipeline", backbone, seed)
    cls, component = {"sdxl": (UNet2DConditionModel, "unet"), "pixart": (PixArtTransformer2DModel, "transformer"),
                      "cogvideox": (CogVideoXTransformer3DModel, "transformer")}[backbone]
    model = cls.from_pretrained(pipeline / component)
    lora_dir = folder / "lora"
    save_student_lora(lora_dir, backbone, random_student_lora(model, seed + 1), RANK, ALPHA, TARGETS, TIMESTEPS, 1)
    return pipeline, lora_dir
