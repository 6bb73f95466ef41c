"""The student's EMA (``use_ema``): the exported LoRA is the EMA of the weights the student had
after each applied generator update, with diffusers EMAModel's decay ramp, checked against an
average computed here from the recorded weights; resume continues it exactly; a checkpoint
trained without it is refused."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tdm_train.distill import TDMConfig
from tdm_train.errors import IncompatibleFile
from tdm_train.lora.export import DIFFUSERS_FILE, diffusers_state_dict
from tdm_train.lora.metadata import EMA_DECAY_KEY

from test_trainer import make_trainer

DECAY = 0.6  # below the ramp's n / (9 + n) from step 14 on: both the ramp and the cap are exercised


def _decay(update: int) -> float:
    """diffusers EMAModel.get_decay without warmup, written out: 0 at the first update (the average
    starts at the weights), then min(decay, n / (9 + n)) at the n-th."""
    return 0.0 if update == 1 else min(DECAY, update / (9 + update))


def test_exported_lora_is_the_ema_of_the_trained_weights_lora_and_k_embedding(tmp_path):
    trainer = make_trainer(tmp_path, max_train_steps=16, checkpointing_steps=16, use_ema=True, ema_decay=DECAY,
                           tdm=TDMConfig(guidance_scale=2.0, unify_steps=(1, 2, 4)), step_embedding_lr_ratio=10.0)
    recorded = []
    trainer.train(progress=False, on_step=lambda t: recorded.append([p.detach().clone() for p in t.student_parameters()]))
    assert len(recorded) == 16 and trainer.ema.optimization_step == 16

    average = None
    for n, weights in enumerate(recorded, start=1):
        d = _decay(n)
        average = [w.clone() if average is None else d * a + (1 - d) * w
                   for a, w in zip(average or [None] * len(weights), weights)]
    raw = recorded[-1]
    for p, r in zip(trainer.student_parameters(), raw):  # exporting left the trained weights in place
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=0)
    with trainer.exported_weights():
        held = [p.detach().clone() for p in trainer.student_parameters()]
        exported_lora = trainer.roles.state_dict("student")
        vectors = trainer.student_step_embedding.vectors((1, 2, 4))
    gap = max(float((h - r).abs().max()) for h, r in zip(held, raw))
    assert gap > 1e-4, "the EMA should differ from the last weights"
    for h, a in zip(held, average):
        torch.testing.assert_close(h, a, rtol=1e-5, atol=1e-7)

    saved = load_file(str(tmp_path / DIFFUSERS_FILE))
    for key, value in diffusers_state_dict(exported_lora, "unet").items():  # the file holds the EMA LoRA ...
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    for k, vector in vectors.items():  # ... and the EMA K embedding's c_K
        torch.testing.assert_close(saved[f"tdm_step_embedding.k{k}"], vector)
    with safe_open(str(tmp_path / DIFFUSERS_FILE), "pt") as f:
        assert f.metadata()[EMA_DECAY_KEY] == "0.6"
    assert "EMA of the student's (decay 0.6" in (tmp_path / "README.md").read_text()

    trainer.output_dir = tmp_path / "trained"  # ema=False: the weights as trained, and no EMA claim
    trained_file, _ = trainer.export_lora(ema=False)
    saved = load_file(str(trained_file))
    for key, value in diffusers_state_dict(trainer.roles.state_dict("student"), "unet").items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    with safe_open(str(trained_file), "pt") as f:
        assert EMA_DECAY_KEY not in f.metadata()


def test_skipped_updates_do_not_move_the_average(tmp_path):
    from test_trainer import NaNAfter

    trainer = make_trainer(tmp_path, backend_cls=NaNAfter, max_train_steps=10, use_ema=True, ema_decay=DECAY)
    trainer.train_step()
    before = [s.clone() for s in trainer.ema.shadow_params]
    NaNAfter.armed = True
    try:
        assert trainer.train_step()["skipped_nonfinite"]
    finally:
        NaNAfter.armed = False
    assert trainer.ema.optimization_step == 1
    for s, b in zip(trainer.ema.shadow_params, before):
        torch.testing.assert_close(s, b, rtol=0, atol=0)


def test_resume_continues_the_average_exactly(tmp_path):
    straight = make_trainer(tmp_path / "straight", use_ema=True, ema_decay=DECAY)
    straight.train(progress=False)
    make_trainer(tmp_path / "resumed", max_train_steps=2, use_ema=True, ema_decay=DECAY).train(progress=False)
    resumed = make_trainer(tmp_path / "resumed", use_ema=True, ema_decay=DECAY, resume_from_checkpoint="latest")
    resumed.train(progress=False)
    assert resumed.ema.optimization_step == straight.ema.optimization_step == 4
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    a, b = load_file(str(tmp_path / "straight" / DIFFUSERS_FILE)), load_file(str(tmp_path / "resumed" / DIFFUSERS_FILE))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_resuming_with_another_ema_setting_is_refused(tmp_path, first, then):
    make_trainer(tmp_path, max_train_steps=2, use_ema=first).train(progress=False)
    with pytest.raises(IncompatibleFile, match="--use_ema; resume with the same setting"):
        make_trainer(tmp_path, use_ema=then, resume_from_checkpoint="latest").train(progress=False)


def test_bad_ema_decay_is_refused():
    from tdm_train.training.trainer import TrainConfig

    with pytest.raises(ValueError, match="--ema_decay must lie in"):
        TrainConfig(use_ema=True, ema_decay=1.0)
