"""CogVideoX (CogVideoXTransformer3DModel, v-prediction on a zero-terminal-SNR schedule with
snr_shift_scale) behind the x0-predictor protocol. Latents are [B, F, C, H, W]."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .base import Condition, EncodedNegativeBackend

COGVIDEOX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class CogVideoXBackend(EncodedNegativeBackend):
    """Conditions: ``prompt_embeds`` [B, 226, 4096] (T5, no mask). The unconditional input is
    T5("") given once as ``negative``. x0 comes from v exactly (x0 = alpha x_t - sigma v), which
    stays finite at t = 999 where alpha = 0."""

    name = "cogvideox"
    default_lora_targets = COGVIDEOX_LORA_TARGETS

    def __init__(self, transformer, scheduler_config: dict, negative: Condition, height: int = 480,
                 width: int = 720, frames: int = 49, temporal_compression: int = 4, spatial_compression: int = 8):
        if transformer.config.use_rotary_positional_embeddings:
            raise ValueError(
                "this CogVideoX transformer uses rotary position embeddings (CogVideoX-5B / 1.5); the TDM "
                "trainer supports CogVideoX-2B, which has none"
            )
        self.model = transformer
        self.schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
        if self.schedule.prediction_type != "v_prediction":
            raise ValueError(f"CogVideoX expects a v_prediction scheduler config, got {self.schedule.prediction_type}")
        self.negative = negative
        self.latent_frames = (frames - 1) // temporal_compression + 1
        self.latent_height, self.latent_width = height // spatial_compression, width // spatial_compression

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.latent_frames, self.model.config.in_channels, self.latent_height, self.latent_width)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = self.dtype
        v = self.model(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep=t,
            image_rotary_emb=None,
            return_dict=False,
        )[0]
        return self.schedule.x0_from_output(v, x_t, t)
