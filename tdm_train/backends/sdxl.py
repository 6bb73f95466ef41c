"""SDXL (UNet2DConditionModel, eps-prediction) behind the x0-predictor protocol."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .base import Backend, Condition

# Attention projections of every transformer block (the LoRA that ComfyUI and diffusers both load).
SDXL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SDXLBackend(Backend):
    """Conditions: ``prompt_embeds`` [B, 77, 2048] (penultimate states of both text encoders),
    ``text_embeds`` [B, 1280] (pooled, encoder 2) and ``time_ids`` [B, 6] (original size, crop,
    target size). The unconditional input is all zeros (SDXL's force_zeros_for_empty_prompt)."""

    name = "sdxl"
    default_lora_targets = SDXL_LORA_TARGETS

    def __init__(self, unet, scheduler_config: dict, resolution: int = 1024):
        self.model = unet
        self.schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
        self.resolution = resolution  # in pixels; SDXL's VAE downsamples by 8

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        side = self.resolution // 8
        return (batch, self.model.config.in_channels, side, side)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = self.dtype
        eps = self.model(
            x_t.to(dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
        ).sample
        return self.schedule.x0_from_output(eps, x_t, t)  # float32 schedule math

    def unconditional(self, cond: Condition) -> Condition:
        return {
            "prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
            "text_embeds": torch.zeros_like(cond["text_embeds"]),
            "time_ids": cond["time_ids"],
        }
