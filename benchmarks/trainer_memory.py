"""What one shared base with two LoRA adapters saves over the official demo's three full copies,
how many network evaluations one TDM iteration costs, and how long an iteration takes.

    .venv/bin/python benchmarks/trainer_memory.py [--steps 5]

Parameter bytes are counted for a tiny SDXL-shaped UNet (the one the tests train) and for the
real SDXL UNet config instantiated on the meta device (no weights, no download). LoRA sizes are
exact: rank * (in + out) per targeted Linear. Evaluations are counted with a forward hook on the
tiny UNet during real trainer steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tdm_train.backends import SDXLBackend  # noqa: E402
from tdm_train.backends.sdxl import SDXL_LORA_TARGETS  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_unet  # noqa: E402
from tdm_train.training.trainer import TDMTrainer, TrainConfig  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# the wider list of LCM-LoRA / DMD2
WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def lora_parameters(model: torch.nn.Module, targets, rank: int) -> int:
    """Exact LoRA size: rank * (in + out) per targeted Linear, rank * (in*k*k + out) per Conv2d."""
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * k + module.out_channels)
    return total


def memory_row(name: str, model: torch.nn.Module, targets, rank: int, base_dtype_bytes: int) -> str:
    base = sum(p.numel() for p in model.parameters())
    lora = lora_parameters(model, targets, rank)
    shared = base * base_dtype_bytes + 2 * lora * 4  # frozen base + two fp32 adapters
    three = 3 * base * base_dtype_bytes
    return (f"| {name} | {base / 1e6:,.1f}M | {lora / 1e6:,.2f}M x 2 | {shared / 2**30:.3f} | {three / 2**30:.3f} | "
            f"{shared / (base * base_dtype_bytes):.3f} | {three / (base * base_dtype_bytes):.1f} |")


def count_evaluations(steps: int) -> tuple[float, float, float]:
    """(forwards per iteration, sample-evaluations per iteration, seconds per iteration) of the
    trainer on the tiny UNet at batch 2, CFG on (so the teacher's cond + uncond pass is batched)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    conditions = {"prompt_embeds": torch.randn(4, 8, 64, generator=gen), "text_embeds": torch.randn(4, 32, generator=gen),
                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(4, 1)}
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, max_train_steps=steps + 1, train_batch_size=2, lora_rank=4,
                             lora_alpha=4, checkpointing_steps=10_000, tdm=TDMConfig(guidance_scale=4.5))
        trainer = TDMTrainer(SDXLBackend(tiny_sdxl_unet(), SDXL_SCHEDULER_CONFIG, resolution=128), conditions, config)
        calls = []
        trainer.backend.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]),
                                                        with_kwargs=True)
        trainer.train_step()  # warm-up
        calls.clear()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
    return len(calls) / steps, sum(calls) / (2 * steps), statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32, help="the trainer's default LoRA rank")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        sdxl = UNet2DConditionModel(**SDXL_UNET)
    tiny = tiny_sdxl_unet()
    print("GiB of parameters held for the three roles (LoRA weights fp32)\n")
    print("| model, LoRA targets | base params | LoRA params | one base + 2 adapters | 3 full copies (demo) | "
          "ours / one base | demo / one base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(memory_row("tiny SDXL-shaped, fp32 base, attention", tiny, SDXL_LORA_TARGETS, 4, 4))
    print(memory_row(f"SDXL (real config, meta), bf16 base, attention, rank {args.rank} (default)", sdxl,
                     SDXL_LORA_TARGETS, args.rank, 2))
    print(memory_row(f"SDXL, bf16 base, attention, rank {2 * args.rank}", sdxl, SDXL_LORA_TARGETS, 2 * args.rank, 2))
    print(memory_row(f"SDXL, bf16 base, LCM/DMD2 wide list, rank {args.rank}", sdxl, WIDE_TARGETS, args.rank, 2))
    forwards, evaluations, seconds = count_evaluations(args.steps)
    print("\n| per TDM iteration (K = 4, CFG on, 1 fake update) | ours | official demo |")
    print("|---|---:|---:|")
    print(f"| network forwards | {forwards:.0f} | 11 |")
    print(f"| per-sample network evaluations (cond + uncond counted as 2) | {evaluations:.0f} | 11 |")
    print(f"| wall time per iteration, tiny SDXL UNet, batch 2, 16x16 latents, 1 thread | {seconds * 1e3:.0f} ms | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
