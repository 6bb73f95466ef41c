"""SD3 / SD3.5 (SD3Transformer2DModel, rectified-flow velocity prediction) behind the x0-predictor
protocol.

The schedule is the folder's FlowMatchEulerDiscreteScheduler config (shift 3.0 for SD3-Medium and
SD3.5), tabulated by index as diffusers does: index t holds the shifted sigma of unshifted time
(t + 1) / 1000. The network is fed sigma * 1000, the timestep diffusers' pipeline passes, not the
table index (the two differ wherever shift != 1: index 749 is sigma 0.9 at shift 3, fed as 900).
The velocity u = eps - x0 gives x0 = x_t - sigma u.
"""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .base import Condition, EncodedNegativeBackend

# every attention projection of the joint blocks, image and context stream (the official TDM
# SD3.5-Medium release's LoraConfig); on SD3.5 the dual-attention layers' attn2 has to_q/k/v/out too
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Backend(EncodedNegativeBackend):
    """Conditions: ``prompt_embeds`` [B, L, 4096] (CLIP-L and CLIP-G penultimate states, padded to
    T5's width, then T5's states along the sequence) and ``pooled_prompt_embeds`` [B, 2048]
    (both CLIPs' pooled outputs). The unconditional input is the encoded empty prompt, given once
    as ``negative`` (SD3's pipeline encodes "" as its negative prompt)."""

    name = "sd3"
    default_lora_targets = SD3_LORA_TARGETS

    def __init__(self, transformer, scheduler_config: dict, negative: Condition, resolution: int = 1024):
        self.model = transformer
        self.schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
        if self.schedule.kind != "flow":
            raise ValueError(f"SD3 needs a flow-matching scheduler config, got {scheduler_config.get('_class_name')}")
        self.negative = negative
        self.resolution = resolution  # pixels; SD3's VAE downsamples by 8

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        side = self.resolution // 8
        return (batch, self.model.config.in_channels, side, side)

    @property
    def family(self) -> str:
        from ..recipes import guidance_family

        return guidance_family(self.name, dict(self.model.config))

    def sampling_metadata(self, timesteps: list[int]) -> dict:
        """What a sampler of another tool needs besides the grid: the flow shift and the sigmas."""
        sigmas = self.schedule.sigma(torch.tensor(timesteps)).tolist()
        return {"flow_shift": self.schedule.shift, "sigmas": [round(float(s), 6) for s in sigmas]}

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the transformer is fed for table index t: sigma_t * 1000."""
        return self.schedule.flow_timestep(t)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = self.dtype
        velocity = self.model(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=self.network_timestep(t).to(x_t.device, torch.float32),
            return_dict=False,
        )[0]
        return self.schedule.x0_from_output(velocity, x_t, t)
