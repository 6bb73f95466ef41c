"""The digits teacher: a class-conditional diffusers UNet2DModel (eps-prediction, DDPM linear
betas, 1000 steps), trained with classifier-free guidance dropout (class 10 = no class).

    .venv/bin/python -m tdm_train.demos.digits.teacher   # retrains and rewrites weights/teacher.safetensors

The shipped weights come from this script with its default seed and settings."""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ... import atomic
from ...schedule import NoiseSchedule
from .data import NULL_CLASS, NUM_CLASSES, load_digits_tensors

WEIGHTS = Path(__file__).resolve().parent / "weights"
TEACHER_FILE = WEIGHTS / "teacher.safetensors"

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1,
    norm_num_groups=16,
    attention_head_dim=32,
)
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def load_teacher(path: Path = TEACHER_FILE):
    """The shipped teacher (eval mode, float32)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run python -m tdm_train.demos.digits.teacher to train it")
    unet = build_unet()
    unet.load_state_dict(load_file(str(path)))
    return unet.eval()


def train(iterations: int, batch_size: int, lr: float, seed: int, cfg_dropout: float, ema_decay: float, log_every: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensors()
    schedule = NoiseSchedule.from_diffusers_config(SCHEDULER_CONFIG)
    unet = build_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=iterations, pct_start=0.05)
    start = time.perf_counter()
    for step in range(1, iterations + 1):
        index = torch.randint(images.shape[0], (batch_size,), generator=gen)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(batch_size, generator=gen) < cfg_dropout] = NULL_CLASS
        t = torch.randint(1000, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        loss = torch.nn.functional.mse_loss(unet(x_t, t, class_labels=y).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - ema_decay)
        if step % log_every == 0:
            print(f"step {step}/{iterations} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
    return ema


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg_dropout", type=float, default=0.1)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--output", default=str(TEACHER_FILE))
    args = parser.parse_args(argv)
    ema = train(args.iterations, args.batch_size, args.lr, args.seed, args.cfg_dropout, args.ema_decay, 500)
    output = Path(args.output)
    metadata = {"config": json.dumps(UNET_CONFIG), "scheduler": json.dumps(SCHEDULER_CONFIG),
                "training": json.dumps(vars(args))}
    atomic.save_safetensors(ema.state_dict(), output, metadata)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
