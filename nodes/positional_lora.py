"""Official releases stored as a positional parameter list (the TDM SD3.5-Medium LoRA's
``tdm_sd3-5_lora.ckpt``: ``{"decay", "ema_parameters": [tensor, ...]}``), converted on load for
the MODEL they are applied to.

A list has no names: they follow from the peft model it was trained as (tdm_train/convert.py).
For ComfyUI's SD3 / SD3.5 models (MMDiT) the diffusers SD3Transformer2DModel config is read off
the loaded model's own unet_config (depth, dual-attention layers, qk norm, embedder sizes: what
ComfyUI's model detection found in the weights), so the same meta-device rebuild as
``python -m tdm_train.convert --base`` names the list without a diffusers folder. Other model
types are refused with the converter's command, which takes the base's config explicitly."""

from __future__ import annotations

import torch

from tdm_train.convert import RELEASES, comfyui_state_dict, lora_from_list, parameter_list

RELEASE_FOR_SD3 = "tdm-sd3.5-medium"


def read_positional_list(path: str):
    """The list of a pickled release checkpoint (weights-only unpickler), or None when the file
    holds an ordinary state dict (then ComfyUI's own loader reads it)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return parameter_list(data)


def sd3_transformer_config(unet_config: dict) -> dict:
    """The diffusers SD3Transformer2DModel config of a ComfyUI MMDiT (comfy/model_detection.py's
    unet_config): hidden size 64 x depth, one 64-wide head per block of depth."""
    depth = int(unet_config["depth"])
    in_channels = int(unet_config.get("in_channels", 16))
    context = (unet_config.get("context_embedder_config") or {}).get("params", {})
    return {
        "_class_name": "SD3Transformer2DModel",
        "num_layers": depth, "num_attention_heads": depth, "attention_head_dim": 64,
        "in_channels": in_channels, "out_channels": int(unet_config.get("out_channels") or in_channels),
        "patch_size": int(unet_config.get("patch_size", 2)),
        "joint_attention_dim": int(context.get("in_features", 4096)),
        "caption_projection_dim": int(context.get("out_features", 64 * depth)),
        "pooled_projection_dim": int(unet_config.get("adm_in_channels") or 2048),
        "pos_embed_max_size": int(unet_config.get("pos_embed_max_size") or 96),
        "sample_size": 128,
        "dual_attention_layers": tuple(int(i) for i in unet_config.get("x_block_self_attn_layers") or ()),
        "qk_norm": "rms_norm" if unet_config.get("qk_norm") == "rms" else None,
    }


def convert_for_model(model, values: list, lora_name: str) -> tuple[dict, dict]:
    """(ComfyUI LoRA state dict with true alphas, its ``tdm.*`` metadata) of a positional list
    for ``model`` (a ModelPatcher). Raises ValueError naming what to do for an unsupported model,
    or the converter's expected and found counts for a list of another base."""
    import comfy.model_base

    diffusion_model = model.model
    if not isinstance(diffusion_model, comfy.model_base.SD3):
        raise ValueError(
            f"{lora_name} is a positional parameter list ({len(values)} tensors, 'ema_parameters'): its names follow "
            f"from the base architecture, which on-load conversion reads off SD3 / SD3.5 models only, not "
            f"{type(diffusion_model).__name__}. Convert it with `python -m tdm_train.convert {lora_name} --release "
            "<tdm-sd3.5-medium|tdm-r1> --base <the base's diffusers folder> --out <folder>` and load the "
            "tdm_lora_comfyui.safetensors it writes")
    release = RELEASES[RELEASE_FOR_SD3]
    config = sd3_transformer_config(diffusion_model.model_config.unet_config)
    state, metadata = lora_from_list(values, config, release, lora_name)
    return comfyui_state_dict(state, release), metadata
