"""Run with 2 CPU processes over gloo: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 this.py OUT_DIR
(`accelerate launch --cpu --num_processes 2` would start only one).

For every scenario each rank writes, under OUT_DIR/<scenario>/: its LoRA weights at the start
(after the trainer synchronised them) and at the end, every gradient its optimizers applied, and
every random draw it made (tests/replay_draws.py), so that the test can replay both ranks' draws
concatenated in ONE process with twice the batch and demand the same gradients and LoRA: that
holds for a mean over processes, not for a sum or a broadcast.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay_draws import record_gradients, recording  # noqa: E402
from test_trainer import tiny_conditions  # noqa: E402

from tdm_train.backends import SDXLBackend  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_unet  # noqa: E402
from tdm_train.training.trainer import TDMTrainer, TrainConfig  # noqa: E402

BATCH_PER_PROCESS = 2
# buckets of 20 kB: the tiny student's 128 kB of LoRA gradients travel in several all-reduces
SCENARIOS = {
    "plain": dict(max_train_steps=2, checkpointing_steps=2),
    # micro-batches (only the last one all-reduces) with recomputed activations
    "accumulation_checkpointing": dict(max_train_steps=2, checkpointing_steps=2, gradient_accumulation_steps=2,
                                       gradient_checkpointing=True),
    # scaled gradients all-reduced, then unscaled
    "fp16": dict(max_train_steps=1, checkpointing_steps=1, mixed_precision="fp16"),
}
# how close 2 x B and 1 x 2B come (relative L2) in the applied gradients and in the LoRA update. fp32:
# float noise, measured <= 5e-5 (gradients) and 1.4e-4 (update). fp16: the base's rounding depends
# on the batch it runs in (measured 7e-3), and AdamW's first step is about lr * sign(g), so entries
# with g near zero flip sign (update measured 0.09). A sum over processes is 1.0 off in the gradients.
GRADIENT_TOLERANCE = {"plain": 1e-4, "accumulation_checkpointing": 1e-4, "fp16": 3e-2}
UPDATE_TOLERANCE = {"plain": 2e-3, "accumulation_checkpointing": 2e-3, "fp16": 0.2}


def scenario_config(name: str, output_dir: Path, train_batch_size: int) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), train_batch_size=train_batch_size, learning_rate=1e-3, lora_rank=4,
                       lora_alpha=4, ddp_bucket_cap_mb=0.02, tdm=TDMConfig(guidance_scale=2.0), **SCENARIOS[name])


def build_trainer(name: str, output_dir: Path, train_batch_size: int, accelerator, lora_seed: int) -> TDMTrainer:
    backend = SDXLBackend(tiny_sdxl_unet(), SDXL_SCHEDULER_CONFIG, resolution=64)
    torch.manual_seed(lora_seed)  # the LoRA initialisation (the base's seed is fixed by tiny_sdxl_unet)
    return TDMTrainer(backend, tiny_conditions(), scenario_config(name, output_dir, train_batch_size), accelerator)


def main(out: Path) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    rank = accelerator.process_index
    for name in SCENARIOS:
        folder = out / name
        # a different LoRA initialisation per process: the trainer must start them all from rank 0's
        trainer = build_trainer(name, folder / "run", BATCH_PER_PROCESS, accelerator, lora_seed=100 + rank)
        initial = {a: trainer.roles.state_dict(a) for a in ("student", "fake")}
        applied = record_gradients(trainer)
        segments = []
        with recording(trainer, segments):
            trainer.train(progress=False)
        final = {a: trainer.roles.state_dict(a) for a in ("student", "fake")}
        torch.save({"initial": initial, "final": final, "applied": applied, "segments": segments,
                    "scalers": {a: s.state_dict() for a, s in trainer.scalers.items()},
                    "buckets": trainer.gradient_averager.num_buckets,
                    "launched_during_backward": trainer.gradient_averager.buckets_launched_during_backward},
                   folder / f"rank{rank}.pt")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
