"""Sampling-steps-aware training (TDM-unify): K per sample from a set, each on its own grid, the
fake score conditioned on K through a zero-initialised embedding, the student a plain LoRA."""

import pytest
import torch

from tdm_train.distill import TDMConfig, TDMObjective
from tdm_train.schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 3)
        self.steps_seen = []
        self.calls = []

    def set_num_steps(self, num_steps):
        self.steps_seen.append(None if num_steps is None else num_steps.tolist())

    def forward(self, x, t, cond):
        self.calls.append(t.tolist())
        return self.layer(x)


def test_each_sample_rolls_out_on_its_own_grid_and_the_fake_is_told_k():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    objective = TDMObjective(schedule, TDMConfig(unify_steps=(4, 1, 2)))
    assert objective.grids == {1: [899], 2: [899, 449], 4: [899, 674, 449, 224]}
    assert objective.timesteps == [899, 674, 449, 224]
    gen = torch.Generator().manual_seed(0)
    student, fake, teacher = Recorder(), Recorder(), Recorder()
    batch = objective.rollout(student, torch.randn(64, 3, generator=gen), generator=gen)
    ks = batch.num_steps.tolist()
    assert set(ks) == {1, 2, 4}
    for b, k in enumerate(ks):
        assert batch.grid[b].tolist() == objective.grids[k] + [0] * (5 - k)
    for _ in range(5):
        loss, _ = objective.fake_score_loss(fake, batch, generator=gen)
        assert fake.steps_seen[-2:] == [ks, None]  # told K for the call, cleared afterwards
        tau = torch.tensor(fake.calls[-1])
        assert (tau >= 20).all() and (tau < 889).all()
    objective.generator_loss(student, teacher, fake, batch, generator=gen)
    step_t = torch.tensor(student.calls[-1])
    for t, k in zip(step_t.tolist(), ks):
        assert t in objective.grids[k]  # the recomputed student step is one of that sample's own steps
    tau = torch.tensor(teacher.calls[-1])
    for t, tau_b, k in zip(step_t.tolist(), tau.tolist(), ks):
        grid = objective.grids[k] + [0]
        s = grid[grid.index(t) + 1]
        assert max(20, s) <= tau_b < t - 10  # separate intervals per K


def test_unify_config_errors():
    with pytest.raises(ValueError, match="distinct"):
        TDMConfig(unify_steps=(2, 2))
    with pytest.raises(ValueError, match="explicit timesteps"):
        TDMConfig(unify_steps=(1, 2), timesteps=(899, 449))
    assert TDMConfig(unify_steps=(4, 1)).num_steps == 4


def test_trainer_conditions_only_the_fake_on_k_and_resumes_it(tmp_path):
    import peft  # noqa: F401
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, max_train_steps=2, tdm=TDMConfig(unify_steps=(1, 2, 4), guidance_scale=2.0))
    embedding = trainer.step_embedding
    assert embedding is not None and float(embedding.proj.weight.detach().abs().sum()) == 0.0  # starts as the plain fake
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([899, 449])
    cond = {k: v[:2] for k, v in trainer.conditions.items()}
    with torch.no_grad():
        embedding.proj.bias.fill_(0.5)
        outputs = {}
        for role in ("teacher", "student", "fake"):
            with trainer.roles.use(role):
                embedding.num_steps = torch.tensor([1, 4])
                on = trainer.backend.x0(x, t, cond)
                embedding.num_steps = None
                off = trainer.backend.x0(x, t, cond)
            outputs[role] = (on - off).abs().max()
        embedding.proj.bias.zero_()
    assert outputs["teacher"] == 0 and outputs["student"] == 0 and outputs["fake"] > 0
    trainer.train(progress=False)
    trained = {k: v.clone() for k, v in embedding.state_dict().items()}
    assert float(trained["proj.weight"].abs().sum()) > 0  # the K embedding learned something
    resumed = make_trainer(tmp_path, max_train_steps=2, resume_from_checkpoint="latest",
                           tdm=TDMConfig(unify_steps=(1, 2, 4), guidance_scale=2.0))
    resumed.load_checkpoint(tmp_path / "checkpoint-2")
    for key, value in trained.items():
        torch.testing.assert_close(resumed.step_embedding.state_dict()[key], value)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert all("lora_" in k for k in exported)  # the student LoRA only: no step embedding
