"""The TDM trainer on a tiny SDXL-shaped UNet: it trains, checkpoints, resumes exactly, skips and
counts non-finite losses, and runs the TTUR ratio."""

import json

import pytest
import torch

import peft  # noqa: F401
import accelerate  # noqa: F401

from tdm_train.errors import BadInput
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
    with pytest.raises(BadInput, match="no checkpoint"):
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


def test_two_cpu_processes_over_gloo_average_gradients_like_one_process_with_twice_the_batch(tmp_path):
    """2 processes x batch B == 1 process x batch 2B on the same samples and draws: the gradients
    each optimizer applies and the LoRA weights. A sum over processes would double the gradients,
    a broadcast would drop rank 1's samples; either fails here. Also with gradient accumulation,
    gradient checkpointing and the fp16 scaler together."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests" / "multiprocess"))
    from replay_draws import record_gradients, replaying
    from train_two_processes import BATCH_PER_PROCESS, GRADIENT_TOLERANCE, SCENARIOS, UPDATE_TOLERANCE, build_trainer

    from tdm_train.training.trainer import SingleProcess

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(29500 + os.getpid() % 1000),
         str(root / "tests" / "multiprocess" / "train_two_processes.py"), str(tmp_path)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    checkpoint = tmp_path / "plain" / "run" / "checkpoint-2"
    assert (checkpoint / "rng_0.pt").is_file() and (checkpoint / "rng_1.pt").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    for name in SCENARIOS:
        ranks = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for adapter in ("student", "fake"):
            for when in ("initial", "final"):  # one model in two processes, from the start
                torch.testing.assert_close(_flat(ranks[0][when][adapter]), _flat(ranks[1][when][adapter]),
                                           rtol=0, atol=0)
            assert _relative(_flat(ranks[0]["final"][adapter]), _flat(ranks[0]["initial"][adapter])) > 0
        assert ranks[0]["scalers"] == ranks[1]["scalers"]
        assert ranks[0]["buckets"] > 1 and ranks[0]["launched_during_backward"] >= 1  # overlapped with backward

        # one process, twice the batch, fed rank 0's and rank 1's draws side by side
        reference = build_trainer(name, tmp_path / name / "reference", 2 * BATCH_PER_PROCESS, SingleProcess("cpu"),
                                  lora_seed=100)  # rank 0's initialisation: the one both processes started from
        for adapter in ("student", "fake"):
            torch.testing.assert_close(_flat(reference.roles.state_dict(adapter)), _flat(ranks[0]["initial"][adapter]),
                                       rtol=0, atol=0)
        applied = record_gradients(reference)
        with replaying(reference, [list(pair) for pair in zip(ranks[0]["segments"], ranks[1]["segments"])]):
            reference.train(progress=False)
        for adapter in ("student", "fake"):
            assert len(applied[adapter]) == len(ranks[0]["applied"][adapter]) == SCENARIOS[name]["max_train_steps"]
            for got, want in zip(ranks[0]["applied"][adapter], applied[adapter]):
                assert _relative(got, want) < GRADIENT_TOLERANCE[name], (name, adapter)
            got = _flat(ranks[0]["final"][adapter]) - _flat(ranks[0]["initial"][adapter])
            want = _flat(reference.roles.state_dict(adapter)) - _flat(ranks[0]["initial"][adapter])
            assert _relative(got, want) < UPDATE_TOLERANCE[name], (name, adapter)


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


# -------------------------------------------------------------- gradient accumulation, fp16 loss scaling
def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in sorted(state)])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _concatenated_groups(segments: list, size: int) -> list[list]:
    """Consecutive recorded segments of one kind, ``size`` at a time: what one big batch replays."""
    groups, i = [], 0
    while i < len(segments):
        group = segments[i: i + size]
        assert len(group) == size and len({kind for kind, _ in group}) == 1
        groups.append(group)
        i += size
    return groups


def test_gradient_accumulation_equals_one_big_batch_on_the_same_draws(tmp_path):
    from replay_draws import record_gradients, recording, replaying

    steps, micro, batch = 2, 2, 2
    accumulated = make_trainer(tmp_path / "accumulated", max_train_steps=steps, train_batch_size=batch,
                               gradient_accumulation_steps=micro)
    big = make_trainer(tmp_path / "big", max_train_steps=steps, train_batch_size=micro * batch)
    initial = {a: _flat(big.roles.state_dict(a)) for a in ("student", "fake")}
    applied = {"accumulated": record_gradients(accumulated), "big": record_gradients(big)}
    segments = []
    with recording(accumulated, segments):
        for _ in range(steps):
            accumulated.train_step()
    assert [kind for kind, _ in segments[:4]] == ["fake", "fake", "generator", "generator"]
    with replaying(big, _concatenated_groups(segments, micro)):
        for _ in range(steps):
            big.train_step()
    for adapter in ("student", "fake"):
        assert len(applied["big"][adapter]) == steps
        for got, want in zip(applied["accumulated"][adapter], applied["big"][adapter]):
            assert _relative(got, want) < 1e-4  # the gradient itself (measured <= 1e-5); a sum instead of a mean: 1.0
        # the LoRA: AdamW divides by sqrt(v), which magnifies float noise on near-zero gradient entries
        # (a few 1e-6 of a 1e-3 step), so the update is compared as a whole
        update = {name: _flat(t.roles.state_dict(adapter)) - initial[adapter] for name, t in
                  (("accumulated", accumulated), ("big", big))}
        assert _relative(update["accumulated"], update["big"]) < 2e-3  # measured <= 3e-4
    assert accumulated.history[-1]["generator_loss"] == pytest.approx(big.history[-1]["generator_loss"], rel=1e-5)


def _scaled_losses(trainer, factor: float) -> None:
    """Multiply both TDM losses by ``factor``: LoRA gradients of ~1e-8, below fp16's smallest
    subnormal (6e-8) on their way back through the fp16 base, as happens at SDXL/CogVideoX sizes."""
    objective = trainer.objective
    fake_loss, generator_loss = objective.fake_score_loss, objective.generator_loss

    def scaled(fn):
        def wrapped(*args, **kwargs):
            loss, stats = fn(*args, **kwargs)
            return loss * factor, stats
        return wrapped

    objective.fake_score_loss, objective.generator_loss = scaled(fake_loss), scaled(generator_loss)


def _one_step_update(tmp_path, mixed_precision, scaler_enabled=True):
    trainer = make_trainer(tmp_path, max_train_steps=1, mixed_precision=mixed_precision)
    if not scaler_enabled:
        trainer.scalers = {a: torch.amp.GradScaler("cpu", enabled=False) for a in trainer.scalers}
    _scaled_losses(trainer, 1e-5)
    before = {a: _flat(trainer.roles.state_dict(a)) for a in ("student", "fake")}
    log = trainer.train_step()
    return {a: _flat(trainer.roles.state_dict(a)) - before[a] for a in before}, log, trainer


def test_fp16_loss_scaling_recovers_gradients_that_underflow_in_fp16(tmp_path):
    reference, _, fp32 = _one_step_update(tmp_path / "fp32", "no")
    assert not any(s.is_enabled() for s in fp32.scalers.values())  # no scaler outside fp16
    scaled, log, fp16 = _one_step_update(tmp_path / "fp16", "fp16")
    assert {p.dtype for n, p in fp16.backend.model.named_parameters() if "lora_" not in n} == {torch.float16}
    assert log["loss_scale_student"] == log["loss_scale_fake"] == 2.0**16 and "skipped_scaler_overflow" not in log
    unscaled, _, _ = _one_step_update(tmp_path / "fp16_no_scaler", "fp16", scaler_enabled=False)
    for adapter in ("student", "fake"):
        assert _relative(scaled[adapter], reference[adapter]) < 0.03  # fp16 forward error, nothing lost
        assert _relative(unscaled[adapter], reference[adapter]) > 0.9  # the gradients underflowed to zero


def test_fp16_overflow_skips_are_counted_apart_and_do_not_stop_training(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=10, mixed_precision="fp16", max_nonfinite_in_a_row=1)
    before = trainer.roles.state_dict("student")
    # a scale far too large: every scaled fp16 gradient overflows
    trainer.scalers = {a: torch.amp.GradScaler("cpu", init_scale=2.0**40) for a in trainer.scalers}
    for _ in range(2):  # more skips in a row than max_nonfinite_in_a_row: calibration, not divergence
        log = trainer.train_step()
        assert log["skipped_scaler_overflow"] and log["generator_grad_norm"] is None
    assert trainer.scaler_skipped_total == 2 and trainer.nonfinite_total == 0 and trainer.nonfinite_in_a_row == 0
    assert trainer.scalers["student"].get_scale() == 2.0**38  # halved per skipped update
    for key, value in trainer.roles.state_dict("student").items():  # nothing was applied
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    for scaler in trainer.scalers.values():
        scaler.update(2.0**10)
    log = trainer.train_step()
    assert "skipped_scaler_overflow" not in log and log["generator_grad_norm"] is not None


def test_fp16_nan_loss_still_stops_training(tmp_path):
    trainer = make_trainer(tmp_path, backend_cls=NaNAfter, max_train_steps=10, mixed_precision="fp16",
                           max_nonfinite_in_a_row=2)
    NaNAfter.armed = True
    try:
        with pytest.raises(TrainingStopped, match="non-finite losses in a row"):
            trainer.train(progress=False)
    finally:
        NaNAfter.armed = False
    assert trainer.nonfinite_total == 2 and trainer.scaler_skipped_total == 0


def test_resume_with_accumulation_and_fp16_scalers_continues_exactly(tmp_path):
    def trainer_for(out, **overrides):
        trainer = make_trainer(out, gradient_accumulation_steps=2, mixed_precision="fp16", **overrides)
        # a scale that moves every update, so resuming must restore it
        trainer.scalers = {a: torch.amp.GradScaler("cpu", growth_interval=1) for a in trainer.scalers}
        return trainer

    straight = trainer_for(tmp_path / "straight", max_train_steps=2)
    straight.train(progress=False)
    trainer_for(tmp_path / "resumed", max_train_steps=1, checkpointing_steps=1).train(progress=False)
    # default scalers here: the checkpoint's growth interval and scale must win
    resumed = make_trainer(tmp_path / "resumed", max_train_steps=2, gradient_accumulation_steps=2,
                           mixed_precision="fp16", resume_from_checkpoint="latest")
    resumed.train(progress=False)
    assert resumed.step == 2
    for adapter in ("student", "fake"):
        assert resumed.scalers[adapter].state_dict() == straight.scalers[adapter].state_dict()
        assert straight.scalers[adapter].get_scale() == 2.0**18  # grew once per update
        torch.testing.assert_close(_flat(resumed.roles.state_dict(adapter)), _flat(straight.roles.state_dict(adapter)),
                                   rtol=0, atol=0)
    assert resumed.optimizers["fake"].state_dict()["state"][0]["step"] == 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps 2"):
        make_trainer(tmp_path / "resumed", max_train_steps=3, mixed_precision="fp16",
                     resume_from_checkpoint="latest").train(progress=False)
