"""Peak memory of full TDM training iterations (forwards, backwards, optimizer steps) on the SDXL
UNet architecture: our one-base layout against the official demo's three-model layout, each
measured in its own fresh subprocess, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/trainer_memory.py [--full-width] [--forwards-only]

It first prints the network evaluations per iteration of every backend (SDXL, PixArt-alpha,
CogVideoX, SD3, SD3.5 on tiny models: the count does not depend on the size).

Layouts (both on ``UNet2DConditionModel`` built from the real SDXL config, random weights):
  ours      the real ``TDMTrainer`` with the SDXL backend and peft roles, as ``python -m tdm_train``
            trains: one frozen bf16 base, LoRA "student" and "fake" (rank 32, alpha 64, attention
            projections) in fp32 with AdamW; real ``train_step`` calls. CFG 4.5 (cond + uncond
            batched into one teacher forward), element-wise Huber, demo mid point.
  official  benchmarks/official_layout.py: the demo's iteration over three full networks, teacher
            frozen, student and fake score trained in full with AdamW (the demo's 11 forwards).
            Two dtype policies: "bf16 weights" (every weight, gradient and AdamW state in bf16:
            the same weight dtype as our base, the smallest the layout can be) and "fp32 + bf16
            autocast" (fp32 weights, gradients and AdamW states, forwards under bf16 autocast:
            the demo's accelerate mixed precision, with bf16 in place of fp16).
Three full fp32-trained SDXL copies do not fit in a 24 GB CPU machine, so the side-by-side
comparison runs on the SDXL architecture with every block width divided by ``--width-divisor``
(block_out_channels, hence the time embedding; same depth, same blocks, same transformer layers
per block, same head count, GroupNorm groups divided alike so each group keeps 10 channels;
the condition widths, 2048 text / 2816 added, are the text encoders' and stay). ``--full-width``
adds our layout on the full 2.57B-parameter SDXL UNet.

Memory: on CUDA, torch.cuda.max_memory_allocated (peak stats reset before each iteration); on a
CPU, the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs before
each iteration), next to the RSS before any model is built and after building (models, LoRA,
optimizers). Models are constructed directly in their weight dtype (no fp32 transient while
building). Iteration 1 allocates the AdamW states; iteration 2 is the steady state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# the wider LoRA target list of LCM-LoRA / DMD2 (tests/test_comfyui_integration.py checks its keys)
WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
TEXT_TOKENS = 77
POLICIES = {"bf16": "bf16 weights", "mixed": "fp32 + bf16 autocast"}


def unet_config(divisor: int) -> dict:
    """SDXL's UNet with every block width divided by ``divisor`` (1: the real config)."""
    config = dict(SDXL_UNET)
    if divisor != 1:
        if any(c % divisor for c in SDXL_UNET["block_out_channels"]) or 32 % divisor:
            raise ValueError(f"--width-divisor {divisor} must divide 32 and every block width")
        config["block_out_channels"] = tuple(c // divisor for c in SDXL_UNET["block_out_channels"])
        config["norm_num_groups"] = SDXL_UNET["norm_num_groups"] // divisor
    return config


# ----------------------------------------------------------------------------- measuring
def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


class Meter:
    """Current and peak memory of this process: CUDA allocator on a GPU, RSS on a CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def current(self) -> int:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.memory_allocated()
        return _status()["VmRSS"]

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return _status()["VmHWM"]


def _conditions(batch_bank: int, resolution: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    bank = {"prompt_embeds": torch.randn(batch_bank, TEXT_TOKENS, SDXL_UNET["cross_attention_dim"], generator=gen),
            "text_embeds": torch.randn(batch_bank, 1280, generator=gen), "time_ids": time_ids.repeat(batch_bank, 1)}
    negative = {"prompt_embeds": torch.zeros(1, TEXT_TOKENS, SDXL_UNET["cross_attention_dim"]),
                "text_embeds": torch.zeros(1, 1280), "time_ids": time_ids}  # SDXL's zeroed empty prompt
    return bank, negative


def worker(args) -> dict:
    """One layout in this (fresh) process; returns its measurements."""
    import torch
    from diffusers import UNet2DConditionModel

    from tdm_train.backends import SDXLBackend
    from tdm_train.distill import TDMConfig
    from tdm_train.schedule import SDXL_SCHEDULER_CONFIG
    from tdm_train.training.trainer import TDMTrainer, TrainConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = Meter(device)
    bank, negative = _conditions(4, args.resolution)
    result = {"layout": args.worker, "policy": args.policy, "divisor": args.width_divisor,
              "resolution": args.resolution, "batch": args.batch, "device": str(device),
              "before": meter.current()}
    weight_dtype = torch.float32 if (args.worker == "official" and args.policy == "mixed") else torch.bfloat16
    start = time.perf_counter()
    torch.set_default_dtype(weight_dtype)  # build straight in the weight dtype
    try:
        unet = UNet2DConditionModel(**unet_config(args.width_divisor))
    finally:
        torch.set_default_dtype(torch.float32)
    result["base_params"] = sum(p.numel() for p in unet.parameters())
    tmp = tempfile.TemporaryDirectory()
    if args.worker == "ours":
        tdm = TDMConfig(guidance_scale=4.5, generator_loss="huber_elementwise", mid_point="demo")
        config = TrainConfig(output_dir=tmp.name, max_train_steps=10 ** 6, train_batch_size=args.batch,
                             mixed_precision="bf16", lora_rank=32, lora_alpha=64.0, checkpointing_steps=10 ** 6,
                             tdm=tdm)
        trainer = TDMTrainer(SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=args.resolution), bank, config)
        step = trainer.train_step
        result["trainable_params"] = sum(p.numel() for p in trainer.roles.parameters("student")) + sum(
            p.numel() for p in trainer.roles.parameters("fake"))
        result["resident_copies"] = 1
    else:
        from official_layout import OfficialDemoLayout, sdxl_eps

        unet.to(device)
        backend = SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=args.resolution)  # for its schedule only
        to = lambda c: {k: v.to(device) for k, v in c.items()}  # noqa: E731
        layout = OfficialDemoLayout(unet, sdxl_eps, backend.schedule.alphas_cumprod.to(device),
                                    backend.latent_shape(1)[1:], to(bank), to(negative), guidance_scale=4.5,
                                    huber=True, separate=True,
                                    autocast_dtype=torch.bfloat16 if args.policy == "mixed" else None)
        step = lambda: layout.train_step(args.batch)  # noqa: E731
        result["trainable_params"] = sum(p.numel() for m in (layout.student, layout.fake) for p in m.parameters())
        result["resident_copies"] = 3
    result["built"] = meter.current()
    result["build_s"] = time.perf_counter() - start
    result["peaks"], result["iteration_s"] = [], []
    for _ in range(args.iterations):
        meter.reset_peak()
        start = time.perf_counter()
        log = step()
        result["iteration_s"].append(time.perf_counter() - start)
        result["peaks"].append(meter.peak())
        result["finite"] = all(v is None or v == v for v in log.values() if isinstance(v, float))
    result["after"] = meter.current()
    tmp.cleanup()
    return result


# ----------------------------------------------------------------------------- network evaluations
def forward_counts(iterations: int = 3) -> list[dict]:
    """Network evaluations (denoiser forward calls) per TDMTrainer iteration for every backend, on
    the tiny models of tdm_train.tiny_models (the count does not depend on the size), CFG on (the
    teacher's cond + uncond batched into one call), counted with a forward hook."""
    import torch

    from tdm_train.backends import CogVideoXBackend, PixArtBackend, SD3Backend, SDXLBackend
    from tdm_train.distill import TDMConfig
    from tdm_train.schedule import SDXL_SCHEDULER_CONFIG
    from tdm_train.tiny_models import (COGVIDEOX_2B_SCHEDULER_CONFIG, PIXART_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG,
                                       tiny_cogvideox_transformer, tiny_pixart_transformer, tiny_sd3_transformer,
                                       tiny_sdxl_unet)
    from tdm_train.training.trainer import TDMTrainer, TrainConfig

    gen = torch.Generator().manual_seed(0)
    sdxl_bank = {"prompt_embeds": torch.randn(2, 8, 64, generator=gen), "text_embeds": torch.randn(2, 32, generator=gen),
                 "time_ids": torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]]).repeat(2, 1)}
    pixart_bank = {"prompt_embeds": torch.randn(2, 6, 32, generator=gen), "prompt_attention_mask": torch.ones(2, 6)}
    cog_bank = {"prompt_embeds": torch.randn(2, 16, 32, generator=gen)}
    sd3_bank = {"prompt_embeds": torch.randn(2, 5, 48, generator=gen), "pooled_prompt_embeds": torch.randn(2, 32, generator=gen)}
    first = lambda bank: {k: v[:1] for k, v in bank.items()}  # noqa: E731  (a negative of the bank's shapes)
    cases = [
        ("sdxl", "DDPM (eps)", SDXLBackend(tiny_sdxl_unet(), SDXL_SCHEDULER_CONFIG, resolution=64), sdxl_bank, 900),
        ("pixart", "DDPM (eps, learned sigma)", PixArtBackend(tiny_pixart_transformer(), PIXART_SCHEDULER_CONFIG,
                                                              first(pixart_bank), resolution=64), pixart_bank, 900),
        ("cogvideox", "DDPM (v, zero terminal SNR)", CogVideoXBackend(
            tiny_cogvideox_transformer(), COGVIDEOX_2B_SCHEDULER_CONFIG, first(cog_bank), height=16, width=16,
            frames=9), cog_bank, 900),
        ("sd3", "rectified flow", SD3Backend(tiny_sd3_transformer(False), SD3_SCHEDULER_CONFIG, first(sd3_bank), 64),
         sd3_bank, 1000),
        ("sd3.5", "rectified flow", SD3Backend(tiny_sd3_transformer(True), SD3_SCHEDULER_CONFIG, first(sd3_bank), 64),
         sd3_bank, 1000),
    ]
    rows = []
    for name, schedule, backend, bank, total in cases:
        calls = []
        backend.model.register_forward_hook(lambda module, args, output: calls.append(1))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = TDMTrainer(backend, bank, TrainConfig(output_dir=tmp, max_train_steps=10, train_batch_size=2,
                                                            lora_rank=4, lora_alpha=8,
                                                            tdm=TDMConfig(total_steps=total, guidance_scale=4.5)))
            counts = []
            for _ in range(iterations):
                calls.clear()
                trainer.train_step()
                counts.append(len(calls))
        rows.append({"backend": name, "schedule": schedule, "grid": trainer.objective.timesteps, "counts": counts})
    return rows


def print_forward_counts(rows: list[dict]) -> None:
    print("Network evaluations per TDM iteration (denoiser forward calls, CFG 4.5 batched; tiny models, counted "
          "with a forward hook)\n")
    print("| backend | schedule | grid | forwards per iteration | target |")
    print("|---|---|---|---:|---|")
    ddpm = max(max(r["counts"]) for r in rows if not r["backend"].startswith("sd3"))
    for r in rows:
        counts = ", ".join(map(str, r["counts"]))
        target = (f"<= DDPM backends' {ddpm}: {'met' if max(r['counts']) <= ddpm else 'NOT met'}"
                  if r["backend"].startswith("sd3") else "")
        print(f"| {r['backend']} | {r['schedule']} | {'/'.join(map(str, r['grid']))} | {counts} | {target} |")
    print()
    sys.stdout.flush()


# ----------------------------------------------------------------------------- driver
def run_worker(args, layout: str, policy: str, divisor: int, resolution: int, iterations: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", layout, "--policy", policy,
               "--width-divisor", str(divisor), "--resolution", str(resolution), "--batch", str(args.batch),
               "--iterations", str(iterations), "--threads", str(args.threads), "--json-out", out]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"# measuring {layout} ({POLICIES[policy] if layout == 'official' else 'bf16 base, fp32 LoRA'}), "
          f"width / {divisor}, {resolution} px ...", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env=env)
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    print(f"#   done: build {data['build_s']:.0f} s, iterations {', '.join(f'{s:.0f}' for s in data['iteration_s'])} s",
          file=sys.stderr, flush=True)
    return data


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}"


def row(name: str, r: dict) -> str:
    peaks = r["peaks"]
    return (f"| {name} | {r['divisor'] if r['divisor'] != 1 else 'full'} | {r['base_params'] / 1e6:,.0f}M x "
            f"{r['resident_copies']} | {r['trainable_params'] / 1e6:,.1f}M | {gib(r['before'])} | {gib(r['built'])} | "
            + " | ".join(gib(p) for p in peaks) + f" | {gib(max(peaks))} | {gib(max(peaks) - r['before'])} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width-divisor", type=int, default=4, help="block widths divided by this for the side by side")
    parser.add_argument("--resolution", type=int, default=128, help="pixels (latents are 1/8) for the side by side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--policies", default="bf16,mixed", help="official layout dtype policies: bf16, mixed")
    parser.add_argument("--full-width", action="store_true", help="also measure ours on the full SDXL UNet")
    parser.add_argument("--full-resolution", type=int, default=128)
    parser.add_argument("--full-iterations", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="one thread: OpenMP threads on a shared, oversubscribed CPU stall each other")
    parser.add_argument("--forwards-only", action="store_true",
                        help="only the network-evaluations table (every backend on tiny models, seconds)")
    parser.add_argument("--worker", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.json_out).write_text(json.dumps(worker(args)))
        return 0

    print_forward_counts(forward_counts())
    if args.forwards_only:
        return 0
    policies = [p for p in args.policies.split(",") if p]
    results = {"ours": run_worker(args, "ours", "bf16", args.width_divisor, args.resolution, args.iterations)}
    for policy in policies:
        results[policy] = run_worker(args, "official", policy, args.width_divisor, args.resolution, args.iterations)

    ours = results["ours"]
    device = "CUDA max_memory_allocated" if ours["device"].startswith("cuda") else "peak RSS (VmHWM)"
    print(f"Peak memory of TDM training iterations on the SDXL UNet architecture (random weights), {device}, "
          f"GiB; batch {args.batch}, CFG 4.5, {args.threads} thread(s), each layout in its own fresh process\n")
    iters = max(len(r["peaks"]) for r in results.values())
    head = " | ".join(f"peak, iteration {i + 1}" for i in range(iters))
    header = (f"| layout | width divisor | base params x copies | trained params | before models | after building | "
              f"{head} | peak | peak - before |\n|---|---:|---:|---:|---:|---:|" + "---:|" * iters + "---:|---:|")
    print(header)
    print(row(f"ours: TDMTrainer, one bf16 base + 2 fp32 LoRA r32, {args.resolution} px", ours))
    for policy in policies:
        print(row(f"official layout: 3 full models, {POLICIES[policy]}, {args.resolution} px", results[policy]))
    print("\n| ours / official layout (same width, same resolution) | peak | peak - before | target |")
    print("|---|---:|---:|---|")
    for policy in policies:
        off = results[policy]
        ratio = max(ours["peaks"]) / max(off["peaks"])
        net = (max(ours["peaks"]) - ours["before"]) / (max(off["peaks"]) - off["before"])
        print(f"| vs {POLICIES[policy]} | {ratio:.3f} | {net:.3f} | <= 0.45: {'met' if ratio <= 0.45 else 'NOT met'} |")
    sys.stdout.flush()
    if args.full_width:
        full = results["full"] = run_worker(args, "ours", "bf16", 1, args.full_resolution, args.full_iterations)
        head = " | ".join(f"peak, iteration {i + 1}" for i in range(len(full["peaks"])))
        print(f"\nOurs on the full SDXL UNet (real config, 2.57B parameters), {args.full_resolution} px, batch "
              f"{args.batch}, {len(full['peaks'])} iteration(s)\n")
        print(f"| layout | width divisor | base params x copies | trained params | before models | after building | "
              f"{head} | peak | peak - before |\n|---|---:|---:|---:|---:|---:|" + "---:|" * len(full["peaks"])
              + "---:|---:|")
        print(row(f"ours: TDMTrainer, one bf16 base + 2 fp32 LoRA r32, {args.full_resolution} px", full))
    bad = [k for k, r in results.items() if not r.get("finite", True)]
    if bad:
        print(f"\nnon-finite losses in: {', '.join(bad)} (random weights; memory is still what it is)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
