"""Sample-quality figures for the low-dimensional demos."""

from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The (V-statistic) energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two samples:
    zero iff the distributions agree, and an unbiased-enough yardstick at a few thousand samples."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
