"""Latents to uint8 images for validation grids (a VAE decode, or a latent preview without one)."""

from __future__ import annotations

import torch


def decode_to_images(latents: torch.Tensor, vae, backbone: str) -> torch.Tensor:
    """[B, 3, H, W] uint8. Videos ([B, F, C, H, W]) show their first frame."""
    if backbone == "cogvideox":
        latents = latents[:, :1]  # first latent frame -> first frames of the causal VAE
    if vae is None:
        preview = latents[:, 0] if latents.dim() == 5 else latents
        preview = preview[:, :3]
        lo, hi = preview.amin(dim=(1, 2, 3), keepdim=True), preview.amax(dim=(1, 2, 3), keepdim=True)
        return ((preview - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8).cpu()
    scale = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(next(vae.parameters()).dtype) / scale + shift
    if backbone == "cogvideox":
        images = vae.decode(z.permute(0, 2, 1, 3, 4)).sample[:, :, 0]  # [B, C, F, H, W] -> first frame
    else:
        images = vae.decode(z).sample
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
