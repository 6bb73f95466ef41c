"""PixArt-alpha (PixArtTransformer2DModel, eps-prediction with a learned-sigma half) behind the
x0-predictor protocol."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .base import Condition, EncodedNegativeBackend

PIXART_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class PixArtBackend(EncodedNegativeBackend):
    """Conditions: ``prompt_embeds`` [B, 120, 4096] (T5) and ``prompt_attention_mask`` [B, 120].
    The unconditional input is T5("") with its mask (not zeros), given once as ``negative``.
    1024 models (sample_size 128) also take resolution / aspect-ratio micro-conditions."""

    name = "pixart"
    default_lora_targets = PIXART_LORA_TARGETS

    def __init__(self, transformer, scheduler_config: dict, negative: Condition, resolution: int = 1024):
        self.model = transformer
        self.schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
        self.negative = negative
        self.resolution = resolution
        config = transformer.config
        # the output carries eps and a learned variance: keep the eps half only when it is there
        self.learned_sigma = config.out_channels == 2 * config.in_channels
        self.micro_conditions = config.sample_size == 128

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        side = self.resolution // 8
        return (batch, self.model.config.in_channels, side, side)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = self.dtype
        batch, _, height, width = x_t.shape
        added = {"resolution": None, "aspect_ratio": None}
        if self.micro_conditions:
            pixels = torch.tensor([height * 8.0, width * 8.0], device=x_t.device, dtype=dtype)
            added = {"resolution": pixels.repeat(batch, 1),
                     "aspect_ratio": (pixels[0] / pixels[1]).reshape(1, 1).repeat(batch, 1)}
        out = self.model(
            x_t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if self.learned_sigma:
            out = out.chunk(2, dim=1)[0]
        return self.schedule.x0_from_output(out, x_t, t)
