"""A small MLP x0-predictor with EDM-style preconditioning, for low-dimensional toys."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..schedule import NoiseSchedule


class PreconditionedMLP(nn.Module):
    """x0 = c_skip * x_t / alpha + c_out * net(c_in * x_t / alpha, t) (Karras et al. 2022) in the
    VE view sigma_ve = sigma / alpha, written in forms that stay finite where alpha -> 0."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        sigma_data: float = 1.0,
        time_features: int = 16,
    ):
        super().__init__()
        self.schedule = schedule
        self.sigma_data = sigma_data
        self.time_features = time_features
        layers: list[nn.Module] = []
        width = dim + time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        alpha, sigma = self.schedule.coefficients(t, x_t)
        sd = self.sigma_data
        scale = torch.sqrt(sigma**2 + (alpha * sd) ** 2)  # = alpha * sqrt(sigma_ve^2 + sd^2)
        c_in = 1 / scale  # applied to x_t: c_in_ve * x_t / alpha
        c_skip = alpha * sd**2 / scale**2  # applied to x_t: c_skip_ve / alpha
        c_out = sigma * sd / scale
        features = torch.cat([c_in * x_t, self.time_embedding(t)], dim=1)
        return c_skip * x_t + c_out * self.net(features)
