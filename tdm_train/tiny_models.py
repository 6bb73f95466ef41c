"""Tiny diffusers models built from configs, shaped like the real backbones, for tests and
benchmarks on a CPU (nothing is downloaded)."""

from __future__ import annotations

import torch

from .schedule import SDXL_SCHEDULER_CONFIG  # noqa: F401  (re-exported for tests and benchmarks)

# SDXL's UNet layout in miniature: a plain down block then cross-attention blocks, linear
# projections, text_time added conditioning (pooled text embeds + 6 micro-conditions).
TINY_SDXL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    norm_num_groups=8,
)


def tiny_sdxl_unet(seed: int = 0):
    """A randomly initialised SDXL-shaped UNet2DConditionModel (about 1M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SDXL_UNET).eval()


def tiny_sdxl_conditioning(batch: int, seed: int = 0) -> dict:
    """Random prompt embeddings and SDXL added conditions for ``tiny_sdxl_unet``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, 8, 64, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        },
    }
