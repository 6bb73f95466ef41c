"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): prints ComfyUI's LoRA key map (the
LoRA module names its LoraLoader accepts) for the real SDXL UNet, built on the meta device."""

import json
import sys

sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402

# what ComfyUI's detection reads off sd_xl_base_1.0.safetensors
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def main():
    config = comfy.model_detection.model_config_from_unet_config(SDXL_UNET_CONFIG)
    with torch.device("meta"):
        model = config.get_model({}, "", device=torch.device("meta"))
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    print(json.dumps({"model": type(model).__name__, "keys": sorted(key_map)}))


if __name__ == "__main__":
    main()
