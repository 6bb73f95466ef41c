"""SIGMAS for a TDM grid from a ComfyUI model_sampling object (no comfy import: only its
``sigma(timesteps)`` method is used, so this is testable without ComfyUI)."""

from __future__ import annotations

import torch

from tdm_train.presets import SamplingGrid


def grid_sigmas(model_sampling, grid: SamplingGrid) -> torch.Tensor:
    """1-D float32 CPU tensor, descending, ending in 0.0. Integer timesteps are indices of the
    model's own table (``model_sampling.sigmas``, as core's SDTurboScheduler reads it), so SDXL gets
    sigma(899, 674, 449, 224) = 8.3028, 3.0098, 1.3672, 0.6299 and a flow model (SD3, shift 3)
    sigma(999, 749, 499, 249) = 1, 0.9, 0.75, 0.5: the table the trainer trained on, where index t is
    flow time (t + 1) / 1000. (A flow model's ``sigma(t)`` reads t as time t / 1000 instead, 0.1% off
    at 999.) Without a table, ``sigma(t)`` (exact at integers on discrete models). Flow grids
    (flow_shifted) are sigmas already (ComfyUI feeds a flow model timestep = sigma * 1000)."""
    if grid.timesteps is not None:
        table = getattr(model_sampling, "sigmas", None)
        if table is not None:
            sigmas = table.float().cpu()[torch.tensor(grid.timesteps, dtype=torch.long)]
        else:
            sigmas = model_sampling.sigma(torch.tensor(grid.timesteps, dtype=torch.float32)).float().cpu()
    else:
        sigmas = torch.tensor(grid.sigmas, dtype=torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def starts_from_pure_noise(latent_image: torch.Tensor | None) -> bool:
    """txt2img: the latent is empty, so the student must start from pure N(0, I) at its first
    timestep as it was trained. img2img keeps ComfyUI's scaling (noise * sigma + latent)."""
    return latent_image is None or not bool(torch.count_nonzero(latent_image))
