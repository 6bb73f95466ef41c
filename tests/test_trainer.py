"""The TDM trainer on a tiny SDXL-shaped UNet: it trains, checkpoints, resumes exactly, skips and
counts non-finite losses, and runs the TTUR ratio."""

import json

import pytest
import torch

import peft  # noqa: F401
import accelerate  # noqa: F401

from tdm_train.training import checkpoint as ckpt  # noqa: E402
from tdm_train.backends import SDXLBackend  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_unet  # noqa: E402
from tdm_train.training.trainer import TDMTrainer, TrainConfig, TrainingStopped  # noqa: E402


def tiny_conditions(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(n, 8, 64, generator=gen),
        "text_embeds": torch.randn(n, 32, generator=gen),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(n, 1),
    }


def make_trainer(tmp_path, backend_cls=SDXLBackend, **overrides):
    torch.manual_seed(0)
    settings = dict(output_dir=str(tmp_path), max_train_steps=4, train_batch_size=2, learning_rate=1e-3,
                    lora_rank=4, lora_alpha=4, checkpointing_steps=2, seed=0,
                    tdm=TDMConfig(guidance_scale=2.0))
    settings.update(overrides)
    config = TrainConfig(**settings)
    backend = backend_cls(tiny_sdxl_unet(), SDXL_SCHEDULER_CONFIG, resolution=64)
    return TDMTrainer(backend, tiny_conditions(), config)


def test_trains_both_adapters_and_writes_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, checkpoints_total_limit=None)
    before = {a: trainer.roles.state_dict(a) for a in ("student", "fake")}
    summary = trainer.train(progress=False)
    assert summary["step"] == 4 and summary["nonfinite_total"] == 0
    assert {p.split("/")[-1] for p in summary["lora_files"]} == {"pytorch_lora_weights.safetensors",
                                                                 "tdm_lora_comfyui.safetensors"}
    assert (tmp_path / "README.md").is_file()
    for adapter in ("student", "fake"):
        after = trainer.roles.state_dict(adapter)
        assert max((after[k] - before[adapter][k]).abs().max() for k in after) > 0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["timesteps"] == [899, 674, 449, 224] and state["backend"] == "sdxl"
    for name in ("student.safetensors", "fake.safetensors", "optimizer_student.pt", "scheduler_fake.pt", "rng_0.pt"):
        assert (tmp_path / "checkpoint-4" / name).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    history = json.loads((tmp_path / "train_history.json").read_text())
    assert len(history) == 4 and all(h["generator_grad_norm"] is not None for h in history)
    assert all(0 < h["importance_weight_mean"] < 10 and h["normalizer_mean"] > 0 for h in history)


def test_checkpoints_total_limit_rotates(tmp_path):
    make_trainer(tmp_path, max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2).train(progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-6"]


def test_resume_continues_exactly(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.train(progress=False)

    first_half = make_trainer(tmp_path / "resumed", max_train_steps=2)
    first_half.train(progress=False)
    second_half = make_trainer(tmp_path / "resumed", max_train_steps=4, resume_from_checkpoint="latest")
    second_half.train(progress=False)
    assert second_half.step == 4
    for adapter in ("student", "fake"):
        a, b = straight.roles.state_dict(adapter), second_half.roles.state_dict(adapter)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert straight.optimizers["student"].state_dict()["state"][0]["step"] == \
        second_half.optimizers["student"].state_dict()["state"][0]["step"]


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-99")).train(progress=False)


class NaNAfter(SDXLBackend):
    """Returns NaN from every forward once ``armed`` (a diverged model)."""

    armed = False

    def x0(self, x_t, t, cond):
        out = super().x0(x_t, t, cond)
        return out * float("nan") if NaNAfter.armed else out


def test_nonfinite_losses_are_skipped_counted_and_stop_training(tmp_path):
    trainer = make_trainer(tmp_path, backend_cls=NaNAfter, max_train_steps=10, max_nonfinite_in_a_row=3)
    NaNAfter.armed = False
    trainer.train_step()
    trainer.train_step()
    trainer.save_checkpoint()  # the last good checkpoint
    good = trainer.roles.state_dict("student")
    NaNAfter.armed = True
    try:
        log = trainer.train_step()
        assert log["skipped_nonfinite"] and trainer.nonfinite_total == 1
        for key, value in trainer.roles.state_dict("student").items():  # nothing was applied
            torch.testing.assert_close(value, good[key])
        with pytest.raises(TrainingStopped, match="non-finite losses in a row"):
            trainer.train(progress=False)
    finally:
        NaNAfter.armed = False
    assert trainer.nonfinite_in_a_row == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    saved = ckpt.load(tmp_path / "checkpoint-2", 0)["adapters"]["student"]
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_ttur_runs_several_fake_updates_per_generator_update(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=2, fake_updates_per_generator=3)
    trainer.train(progress=False)
    fake_steps = trainer.optimizers["fake"].state_dict()["state"][0]["step"]
    student_steps = trainer.optimizers["student"].state_dict()["state"][0]["step"]
    assert float(fake_steps) == 6 and float(student_steps) == 2


def test_bad_training_configs_fail_before_any_model_is_built():
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="max_train_steps"):
        TrainConfig(max_train_steps=0)


def test_two_cpu_processes_over_gloo_train_one_synchronised_student(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(29500 + os.getpid() % 1000),
         str(root / "tests" / "multiprocess" / "train_two_processes.py"), str(tmp_path)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    ranks = [load_file(str(tmp_path / f"student_rank{r}.safetensors")) for r in (0, 1)]
    initial = [load_file(str(tmp_path / f"initial_rank{r}.safetensors")) for r in (0, 1)]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)  # one model, two processes
        torch.testing.assert_close(initial[0][key], initial[1][key], rtol=0, atol=0)  # synced at start
    assert max((ranks[0][k] - initial[0][k]).abs().max() for k in ranks[0]) > 0
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "rng_0.pt").is_file() and (checkpoint / "rng_1.pt").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_bf16_base_with_fp32_lora_and_gradient_checkpointing(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=2, mixed_precision="bf16", gradient_checkpointing=True)
    base = [p for n, p in trainer.backend.model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    for adapter in ("student", "fake"):
        assert {p.dtype for p in trainer.roles.parameters(adapter)} == {torch.float32}
    before = trainer.roles.state_dict("student")
    summary = trainer.train(progress=False)
    assert summary["nonfinite_total"] == 0
    after = trainer.roles.state_dict("student")
    assert all(v.dtype == torch.float32 for v in after.values())
    assert max((after[k] - before[k]).abs().max() for k in after) > 0
    assert trainer.backend.model.is_gradient_checkpointing
