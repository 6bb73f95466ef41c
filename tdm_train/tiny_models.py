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


def tiny_pixart_transformer(sample_size: int = 8, seed: int = 0):
    """A tiny PixArtTransformer2DModel (learned sigma: 8 output channels). ``sample_size=128`` takes
    the 1024-model path with resolution / aspect-ratio micro-conditions."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()


PIXART_SCHEDULER_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.0001, "beta_end": 0.02,
                           "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def tiny_cogvideox_transformer(seed: int = 0):
    """A tiny CogVideoXTransformer3DModel shaped like CogVideoX-2B (no rotary embeddings)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    ).eval()


# CogVideoX-2B's scheduler (v-prediction, zero terminal SNR, SNR shift 3)
COGVIDEOX_2B_SCHEDULER_CONFIG = {"_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                                 "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                 "snr_shift_scale": 3.0, "timestep_spacing": "trailing"}
