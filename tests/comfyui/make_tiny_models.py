"""Writes tiny ComfyUI-loadable model files for the integration tests (run with ComfyUI's Python,
ComfyUI's root on PYTHONPATH): an SD1.5-structured checkpoint (a 1-level UNet that ComfyUI
detects as SD15, a random-weight CLIP-L text encoder, a TAESD VAE), a TDM LoRA for that
UNet with recorded strength metadata, and a LoRA for another architecture.

    python make_tiny_models.py OUT_DIR   ->  OUT_DIR/checkpoints/tiny_sd15.safetensors,
                                             OUT_DIR/loras/tiny_tdm.safetensors, OUT_DIR/loras/not_sd15.safetensors
"""

import json
import sys
from pathlib import Path

OUT_DIR = Path(sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args parses sys.argv: CPU only, nothing else
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.ops  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)


def main(out: Path) -> None:
    torch.manual_seed(0)
    unet = UNetModel(**UNET, operations=comfy.ops.disable_weight_init)
    for p in unet.parameters():  # a quiet random network: outputs stay small and finite
        torch.nn.init.normal_(p, std=0.02)
    checkpoint = {f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()}
    # SD1.5's text encoder (CLIP-L, ComfyUI's own config) with random weights: every tensor present,
    # so prompts encode to finite conditioning (an absent weight stays uninitialised memory)
    from transformers import CLIPTextConfig, CLIPTextModel

    config = json.loads((Path(comfy.ops.__file__).parent / "sd1_clip_config.json").read_text())
    config.pop("architectures", None)
    clip = CLIPTextModel(CLIPTextConfig(**config))
    for key, value in clip.state_dict().items():
        if not key.endswith("position_ids"):
            checkpoint[f"cond_stage_model.transformer.{key}"] = value.half()
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    checkpoint.update({f"first_stage_model.{k}": v for k, v in taesd.state_dict().items()})
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(out / "checkpoints" / "tiny_sd15.safetensors"))

    # A TDM LoRA on the attention projections of the only transformer block, ComfyUI key format.
    lora = {}
    for proj in ("to_q", "to_k", "to_v"):
        base = f"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.{proj}"
        lora[f"{base}.lora_down.weight"] = torch.randn(4, 320) * 0.01
        lora[f"{base}.lora_up.weight"] = torch.randn(320, 4) * 0.01
        lora[f"{base}.alpha"] = torch.tensor(4.0)
    lora["diffusion_model.not_a_module_of_sd15.lora_down.weight"] = torch.randn(4, 8)  # one key that cannot load
    lora["diffusion_model.not_a_module_of_sd15.lora_up.weight"] = torch.randn(8, 4)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    meta = {"tdm.lora_strength": "0.5", "tdm.sampling": json.dumps({"preset": "tdm_uniform", "steps": 4})}
    save_file(lora, str(out / "loras" / "tiny_tdm.safetensors"), metadata=meta)
    # A LoRA for another architecture (SD3 MMDiT keys): none of its keys fit an SD1.5 UNet.
    other = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 1536),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(1536, 4),
    }
    save_file(other, str(out / "loras" / "not_sd15.safetensors"))


if __name__ == "__main__":
    main(OUT_DIR)
