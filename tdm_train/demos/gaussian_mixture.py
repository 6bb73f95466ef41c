"""A mixture of isotropic Gaussians and its exact diffusion teacher.

For p0 = sum_i pi_i N(mu_i, std^2 I) and x_t = alpha x0 + sigma eps, every marginal is again a
mixture, p_t = sum_i pi_i N(alpha mu_i, v I) with v = alpha^2 std^2 + sigma^2, and the optimal
x0-predictor is known in closed form:

    E[x0 | x_t] = sum_i r_i(x_t) (mu_i + (alpha std^2 / v)(x_t - alpha mu_i)),
    r_i(x_t) proportional to pi_i exp(-|x_t - alpha mu_i|^2 / (2 v)).

So the teacher is exact and every error measured is the student's or the sampler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule


@dataclass
class GaussianMixture:
    means: torch.Tensor  # [M, D]
    std: float
    weights: torch.Tensor  # [M], sums to 1

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 1.5, std: float = 0.1, dim: int = 2) -> GaussianMixture:
        """``num_modes`` equal-weight modes on a circle (in the first two coordinates)."""
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        means = torch.zeros(num_modes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(angles), radius * torch.sin(angles)
        return cls(means, std, torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64))

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def data_std(self) -> float:
        """Per-coordinate standard deviation of the whole mixture (EDM's sigma_data)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        second = (self.weights[:, None] * self.means**2).sum(0) + self.std**2
        return float((second - mean**2).mean().sqrt())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        mode = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[mode] + self.std * noise).float()

    def x0_posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """The exact x0-predictor E[x0 | x_t] at integer timesteps t."""
        alpha, sigma = schedule.coefficients(t, x_t)  # [B, 1]
        means = self.means.to(x_t.device, alpha.dtype)  # [M, D]
        x = x_t.to(alpha.dtype)
        var = alpha**2 * self.std**2 + sigma**2  # [B, 1]
        centred = x[:, None, :] - alpha[:, :, None] * means[None]  # [B, M, D]
        logits = torch.log(self.weights.to(x.device, x.dtype))[None] - centred.pow(2).sum(-1) / (2 * var)
        resp = torch.softmax(logits, dim=1)  # [B, M]
        shrink = (alpha * self.std**2 / var)[:, :, None]  # [B, 1, 1]
        per_mode = means[None] + shrink * centred
        return (resp[:, :, None] * per_mode).sum(1)

    def nearest_mode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the nearest mode, distance to it in units of std) per sample."""
        dist = torch.cdist(x.double(), self.means.to(x.device))
        best, index = dist.min(dim=1)
        return index, best / self.std

    def mode_fractions(self, x: torch.Tensor, max_std: float = 4.0) -> tuple[torch.Tensor, float]:
        """Fraction of samples within ``max_std`` std of each mode, and the fraction of samples
        that lie within ``max_std`` of some mode."""
        index, distance = self.nearest_mode(x)
        inside = distance <= max_std
        counts = torch.bincount(index[inside], minlength=self.num_modes).double()
        return counts / x.shape[0], float(inside.double().mean())
