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


def tiny_cogvideox_vae(seed: int = 0):
    """A tiny AutoencoderKLCogVideoX with CogVideoX's compression (4x in time, 8x in space)."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()


# CogVideoX-2B's scheduler (v-prediction, zero terminal SNR, SNR shift 3)
COGVIDEOX_2B_SCHEDULER_CONFIG = {"_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                                 "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                 "snr_shift_scale": 3.0, "timestep_spacing": "trailing"}


def tiny_sd3_transformer(dual_attention: bool = True, seed: int = 0, in_channels: int = 16):
    """A tiny SD3Transformer2DModel: SD3.5-shaped (a dual-attention first block, qk RMS norm) or
    SD3-shaped. It takes the tiny SD3 folder's text states: joint width 48 (T5's), pooled 32 (the two
    CLIPs' projections)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual_attention else {}
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=in_channels, out_channels=in_channels, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
        pooled_projection_dim=32, pos_embed_max_size=16, **extra,
    ).eval()


# SD3-Medium's and SD3.5-Medium's scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


# ----------------------------------------------------------------------------- tiny pipeline folders
_T5_WORDS = ("a photo of the cat dog red blue green astronaut horse moon riding on in with city night "
             "painting portrait forest river mountain car").split()


def _clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges (514 tokens), built offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def _t5_tokenizer():
    """A word-level T5-style tokenizer (pad 0, eos 1, unk 2) built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *_T5_WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_tiny_pipeline(folder, backbone: str, seed: int = 0):
    """Writes a complete tiny diffusers pipeline folder (model_index.json, scheduler, text
    encoder(s) and tokenizer(s), denoiser, VAE) for ``backbone`` in sdxl / pixart / cogvideox /
    sd3 / sd3.5 (both StableDiffusion3Pipeline folders; sd3.5 with dual attention and qk norm)."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if backbone == "sdxl":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        tokenizer = _clip_tokenizer()
        text_config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
                                     layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5,
                                     vocab_size=len(tokenizer), hidden_act="gelu", projection_dim=32)
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            cls(text_config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / "tokenizer")
        tokenizer.save_pretrained(folder / "tokenizer_2")
        tiny_sdxl_unet(seed).save_pretrained(folder / "unet")
        scheduler, pipeline = dict(SDXL_SCHEDULER_CONFIG), "StableDiffusionXLPipeline"
        components = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    elif backbone in ("sd3", "sd3.5"):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
        for name, hidden in (("text_encoder", 16), ("text_encoder_2", 16)):  # CLIP-L, CLIP-G in miniature
            CLIPTextModelWithProjection(CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5,
                num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer), hidden_act="gelu",
                projection_dim=16)).save_pretrained(folder / name)
        T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=48, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).save_pretrained(
            folder / "text_encoder_3")
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer.save_pretrained(folder / name)
        t5_tokenizer.save_pretrained(folder / "tokenizer_3")
        tiny_sd3_transformer(backbone == "sd3.5", seed).save_pretrained(folder / "transformer")
        AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                      down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                      latent_channels=16, sample_size=32, norm_num_groups=8, scaling_factor=1.5305,
                      shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder / "vae")
        scheduler, pipeline = dict(SD3_SCHEDULER_CONFIG), "StableDiffusion3Pipeline"
        components = {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                      **{f"text_encoder{s}": ["transformers", "CLIPTextModelWithProjection"] for s in ("", "_2")},
                      "text_encoder_3": ["transformers", "T5EncoderModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "tokenizer_3": ["transformers", "PreTrainedTokenizerFast"]}  # tokenizer.json (word level)
    else:
        from transformers import T5Config, T5EncoderModel

        tokenizer = _t5_tokenizer()
        T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).save_pretrained(
            folder / "text_encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
        if backbone == "pixart":
            tiny_pixart_transformer(8, seed).save_pretrained(folder / "transformer")
            scheduler, pipeline = dict(PIXART_SCHEDULER_CONFIG), "PixArtAlphaPipeline"
            denoiser = ["diffusers", "PixArtTransformer2DModel"]
        elif backbone == "cogvideox":
            tiny_cogvideox_transformer(seed).save_pretrained(folder / "transformer")
            tiny_cogvideox_vae(seed).save_pretrained(folder / "vae")
            scheduler, pipeline = dict(COGVIDEOX_2B_SCHEDULER_CONFIG), "CogVideoXPipeline"
            denoiser = ["diffusers", "CogVideoXTransformer3DModel"]
        else:
            raise ValueError(f"unknown backbone {backbone!r}")
        components = {"transformer": denoiser, "text_encoder": ["transformers", "T5EncoderModel"],
                      "tokenizer": ["transformers", "T5Tokenizer"]}
        if backbone == "cogvideox":
            components["vae"] = ["diffusers", "AutoencoderKLCogVideoX"]
    if backbone in ("sdxl", "pixart"):
        AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                      down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                      latent_channels=4, sample_size=32, norm_num_groups=8).save_pretrained(folder / "vae")
        components["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    components["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}, indent=2))
    return folder
