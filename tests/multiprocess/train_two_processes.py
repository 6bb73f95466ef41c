"""Run with 2 CPU processes over gloo: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 this.py OUT_DIR
(`accelerate launch --cpu --num_processes 2` would start only one). Each rank writes its student LoRA."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_trainer import tiny_conditions  # noqa: E402

from tdm_train.backends import SDXLBackend  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_unet  # noqa: E402
from tdm_train.training.trainer import TDMTrainer, TrainConfig  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    torch.manual_seed(100 + accelerator.process_index)  # different local inits: the trainer must sync them
    config = TrainConfig(output_dir=str(out / "run"), max_train_steps=3, train_batch_size=2, learning_rate=1e-3,
                         lora_rank=4, lora_alpha=4, checkpointing_steps=3, tdm=TDMConfig(guidance_scale=2.0))
    backend = SDXLBackend(tiny_sdxl_unet(), SDXL_SCHEDULER_CONFIG, resolution=64)
    trainer = TDMTrainer(backend, tiny_conditions(), config, accelerator)
    initial = trainer.roles.state_dict("student")
    trainer.train(progress=False)
    final = trainer.roles.state_dict("student")
    save_file({k: v.contiguous() for k, v in final.items()}, str(out / f"student_rank{accelerator.process_index}.safetensors"))
    save_file({k: v.contiguous() for k, v in initial.items()}, str(out / f"initial_rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
