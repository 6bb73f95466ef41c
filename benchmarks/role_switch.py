"""Time of one teacher/student/fake role switch, before (peft's set_adapter / enable_adapters,
walking every module) and after (AdapterRoles' cached layers and parameters, flags set directly),
on the tiny test models and on the real PixArt-XL-2-512x512 transformer and SDXL-base UNet
architectures, built on the meta device from their configs (nothing downloaded, no weights in
memory). Also the weight-wrapper roles (ComfyUI's path, WeightLoraRoles) before/after caching.

    .venv/bin/python benchmarks/role_switch.py [--rounds 20] [--models tiny-sdxl,pixart-xl,sdxl]

One switch = one step of the cycle student -> fake -> student -> teacher -> student -> fake ...
(a TDM iteration makes about 6). ms per switch = best of ``--rounds`` timings of the whole cycle.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tdm_train.backends.pixart import PIXART_LORA_TARGETS  # noqa: E402
from tdm_train.backends.sdxl import SDXL_LORA_TARGETS  # noqa: E402
from tdm_train.lora.weight_wrappers import WeightLoraRoles, lora_targets  # noqa: E402
from tdm_train.training.roles import ADAPTERS, AdapterRoles, activate_with_peft, lora_config  # noqa: E402

CYCLE = ("fake", "student", "teacher", "student", "fake", "student")

# PixArt-alpha/PixArt-XL-2-512x512, transformer/config.json
PIXART_XL_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=64,
                     patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
                     use_additional_conditions=False)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_BASE = dict(sample_size=128, in_channels=4, out_channels=4, down_block_types=(
    "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
    "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280), layers_per_block=2,
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def build(name: str) -> torch.nn.Module:
    if name == "tiny-sdxl":
        from tdm_train.tiny_models import tiny_sdxl_unet

        return tiny_sdxl_unet()
    if name == "tiny-pixart":
        from tdm_train.tiny_models import tiny_pixart_transformer

        return tiny_pixart_transformer()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "pixart-xl":
            from diffusers import PixArtTransformer2DModel

            return PixArtTransformer2DModel(**PIXART_XL_512)
        if name == "sdxl":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**SDXL_BASE)
    raise ValueError(f"unknown model {name!r}")


def ms_per_switch(switch, rounds: int) -> float:
    for role in CYCLE:  # warm-up
        switch(role)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for role in CYCLE:
            switch(role)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(CYCLE)


def weight_roles_before(roles: WeightLoraRoles, role: str) -> None:
    """WeightLoraRoles.activate before its parameter lists were cached (rebuilt from every wrapper's
    ParameterDicts on each switch)."""
    for adapter in ADAPTERS:
        for wrapper in roles.wrappers.values():
            for p in (wrapper.down[adapter], wrapper.up[adapter]):
                p.requires_grad_(adapter == role)
    roles._role = role


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--models", default="tiny-sdxl,tiny-pixart,pixart-xl,sdxl")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    targets = {"tiny-sdxl": SDXL_LORA_TARGETS, "sdxl": SDXL_LORA_TARGETS, "tiny-pixart": PIXART_LORA_TARGETS,
               "pixart-xl": PIXART_LORA_TARGETS}
    rows = []
    for name in args.models.split(","):
        model = build(name)
        device = next(model.parameters()).device
        roles = AdapterRoles(model, lora_config(args.rank, args.rank, targets[name]), seed=0)
        before = ms_per_switch(lambda r: activate_with_peft(model, r), args.rounds)
        roles._role = None  # activate_with_peft changed the flags behind the roles' back

        def after(r):
            roles.activate(r)

        after_ms = ms_per_switch(after, args.rounds)
        shapes = lora_targets(build(name), targets[name])
        weight = WeightLoraRoles(shapes, args.rank, args.rank, device=device)
        w_before = ms_per_switch(lambda r: weight_roles_before(weight, r), args.rounds)
        w_after = ms_per_switch(weight.activate, args.rounds)
        rows.append((name, len(roles._layers), before, after_ms, len(shapes), w_before, w_after))
        del model, roles, weight

    head = ("model", "tuner layers", "peft set_adapter ms", "AdapterRoles ms", "speed-up",
            "weight wrappers", "WeightLoraRoles before ms", "after ms")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for name, layers, before, after_ms, wrappers, w_before, w_after in rows:
        print(f"| {name} | {layers} | {before:.3f} | {after_ms:.3f} | {before / after_ms:.0f}x | {wrappers} | "
              f"{w_before:.3f} | {w_after:.3f} |")
    print(f"\nms per switch, best of {args.rounds} cycles of {len(CYCLE)} switches; LoRA rank {args.rank} on "
          f"{', '.join(SDXL_LORA_TARGETS)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
