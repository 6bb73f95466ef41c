"""The digits teacher (class-conditional diffusers UNet2DModel, eps-prediction) behind the
x0-predictor protocol: the toy backend of the embedded default, trained by the same trainer as
the big models. Conditions are class labels; the unconditional input is the null class."""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .base import Backend, Condition

DIGITS_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


class DigitsBackend(Backend):
    name = "digits"
    default_lora_targets = DIGITS_LORA_TARGETS

    def __init__(self, unet, scheduler_config: dict, null_class: int):
        self.model = unet
        self.schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
        self.null_class = null_class

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        size = self.model.config.sample_size
        return (batch, self.model.config.in_channels, size, size)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        eps = self.model(x_t.to(self.dtype), t, class_labels=cond["class_labels"]).sample
        return self.schedule.x0_from_output(eps, x_t, t)

    def unconditional(self, cond: Condition) -> Condition:
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_class)}
