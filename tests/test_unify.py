"""Sampling-steps-aware training (TDM-unify): K per sample from a set, each on its own grid, the
student and the fake score each conditioned on K through its own zero-initialised embedding; the
student's condition travels with its LoRA files and sampling with it is the trained student."""

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
        self.told = []  # the K told for each call (None: not told)
        self.current = None

    def set_num_steps(self, num_steps):
        self.steps_seen.append(None if num_steps is None else num_steps.tolist())
        self.current = self.steps_seen[-1]

    def forward(self, x, t, cond):
        self.calls.append(t.tolist())
        self.told.append(self.current)
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
    # the rollout: every student call is told the K of each of its samples, on that K's grid
    assert len(student.calls) == 1 + 2 + 4
    for t_call, told in zip(student.calls, student.told):
        assert told is not None and len(told) == len(t_call) and len(set(told)) == 1
        assert t_call[0] in objective.grids[told[0]]
    assert sorted(k for told in student.told for k in told) == sorted(
        k for k in ks for _ in range(k))  # each sample told its own K at each of its K steps
    assert student.steps_seen[-1] is None  # cleared after the rollout
    for b, k in enumerate(ks):
        assert batch.grid[b].tolist() == objective.grids[k] + [0] * (5 - k)
    for _ in range(5):
        loss, _ = objective.fake_score_loss(fake, batch, generator=gen)
        assert fake.steps_seen[-2:] == [ks, None]  # told K for the call, cleared afterwards
        tau = torch.tensor(fake.calls[-1])
        assert (tau >= 20).all() and (tau < 889).all()
    objective.generator_loss(student, teacher, fake, batch, generator=gen)
    assert student.told[-1] == ks and student.steps_seen[-1] is None  # the recomputed step: each sample's K
    assert teacher.told == [None] * len(teacher.calls)  # the teacher is never told K
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
    with pytest.raises(ValueError, match="one weight >= 0 per step count"):
        TDMConfig(unify_steps=(1, 2), unify_weights=(1.0,))
    with pytest.raises(ValueError, match="needs unify_steps"):
        TDMConfig(unify_weights=(1.0,))
    assert TDMConfig(unify_steps=(4, 1), unify_weights=(3, 1)).unify_weights == (1.0, 3.0)  # sorted with K


def test_unify_weights_set_how_often_each_k_is_drawn():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    objective = TDMObjective(schedule, TDMConfig(unify_steps=(1, 2, 4), unify_weights=(0.0, 3.0, 1.0)))
    gen = torch.Generator().manual_seed(0)
    ks = objective.rollout(Recorder(), torch.randn(4000, 3, generator=gen), generator=gen).num_steps
    assert 1 not in ks.tolist()
    assert abs(float((ks == 2).double().mean()) - 0.75) < 0.03


UNIFY = dict(unify_steps=(1, 2, 4), guidance_scale=2.0)


def _outputs_by_role(trainer, embedding, ks):
    """|x0 with K told - x0 without| per role, with ``embedding``'s bias set to 0.5."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([899, 449])
    cond = {k: v[:2] for k, v in trainer.conditions.items()}
    outputs = {}
    with torch.no_grad():
        saved = embedding.proj.bias.clone()
        embedding.proj.bias.fill_(0.5)
        for role in ("teacher", "student", "fake"):
            with trainer.roles.use(role):
                embedding.num_steps = torch.tensor(ks)
                on = trainer.backend.x0(x, t, cond)
                embedding.num_steps = None
                off = trainer.backend.x0(x, t, cond)
            outputs[role] = float((on - off).abs().max())
        embedding.proj.bias.copy_(saved)
    return outputs


def test_student_and_fake_each_have_a_zero_started_k_embedding_active_in_their_own_role(tmp_path):
    import peft  # noqa: F401  (the dev extra: a missing peft fails)
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, max_train_steps=2, tdm=TDMConfig(**UNIFY))
    fake_embedding, student_embedding = trainer.step_embedding, trainer.student_step_embedding
    assert fake_embedding is not None and student_embedding is not None and fake_embedding is not student_embedding
    assert trainer.student.step_embedding is student_embedding and trainer.fake.step_embedding is fake_embedding
    for embedding in (fake_embedding, student_embedding):  # zero-initialised: the plain LoRA roles
        assert all(float(p.detach().abs().sum()) == 0.0 for p in embedding.parameters())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([899, 449])
    cond = {k: v[:2] for k, v in trainer.conditions.items()}
    with torch.no_grad(), trainer.roles.use("student"):
        plain = trainer.backend.x0(x, t, cond)
        student_embedding.num_steps = torch.tensor([1, 4])
        told = trainer.backend.x0(x, t, cond)
        student_embedding.num_steps = None
    assert torch.equal(plain, told)  # a fresh unify student is the plain LoRA student
    fake = _outputs_by_role(trainer, fake_embedding, [1, 4])
    assert fake["teacher"] == 0 and fake["student"] == 0 and fake["fake"] > 0
    student = _outputs_by_role(trainer, student_embedding, [1, 4])
    assert student["teacher"] == 0 and student["fake"] == 0 and student["student"] > 0
    # the student's K embedding is trained with the student's optimizer, the fake's with the fake's
    student_params = {id(p) for group in trainer.optimizers["student"].param_groups for p in group["params"]}
    fake_params = {id(p) for group in trainer.optimizers["fake"].param_groups for p in group["params"]}
    assert {id(p) for p in student_embedding.parameters()} <= student_params - fake_params
    assert {id(p) for p in fake_embedding.parameters()} <= fake_params - student_params


def test_k_embeddings_get_gradients_only_in_their_own_role(tmp_path):
    import peft  # noqa: F401  (the dev extra: a missing peft fails)
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, max_train_steps=2, tdm=TDMConfig(**UNIFY))
    fake_embedding, student_embedding = trainer.step_embedding, trainer.student_step_embedding
    noise, cond, uncond = trainer._batch()
    with trainer.roles.use("student"):
        trajectory = trainer.objective.rollout(trainer.student, noise, cond, trainer.generator)
    assert student_embedding.num_steps is None and fake_embedding.num_steps is None
    with trainer.roles.use("fake"):
        loss, _ = trainer.objective.fake_score_loss(trainer.fake, trajectory, cond, trainer.generator)
        loss.backward()
    assert fake_embedding.proj.weight.grad is not None and float(fake_embedding.proj.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in student_embedding.parameters())
    fake_embedding.zero_grad(set_to_none=True)
    with trainer.roles.use("student"):
        loss, _ = trainer.objective.generator_loss(trainer.student, trainer.teacher, trainer.fake, trajectory, cond,
                                                   uncond, trainer.generator)
        loss.backward()
    assert student_embedding.proj.weight.grad is not None and float(student_embedding.proj.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in fake_embedding.parameters())
    assert student_embedding.num_steps is None and fake_embedding.num_steps is None


def test_unify_trainer_resumes_exactly_and_refuses_a_checkpoint_without_the_student_embedding(tmp_path):
    import peft  # noqa: F401  (the dev extra: a missing peft fails)
    import shutil

    from test_trainer import make_trainer

    straight = make_trainer(tmp_path / "straight", max_train_steps=4, tdm=TDMConfig(**UNIFY))
    straight.train(progress=False)
    assert float(straight.student_step_embedding.proj.weight.detach().abs().sum()) > 0  # it learned something
    first = make_trainer(tmp_path / "resumed", max_train_steps=2, tdm=TDMConfig(**UNIFY))
    first.train(progress=False)
    resumed = make_trainer(tmp_path / "resumed", max_train_steps=4, resume_from_checkpoint="latest",
                           tdm=TDMConfig(**UNIFY))
    resumed.train(progress=False)
    for a, b in ((straight.student_step_embedding, resumed.student_step_embedding),
                 (straight.step_embedding, resumed.step_embedding)):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    for adapter in ("student", "fake"):
        for key, value in straight.roles.state_dict(adapter).items():
            torch.testing.assert_close(resumed.roles.state_dict(adapter)[key], value, rtol=0, atol=0)
    old = tmp_path / "old" / "checkpoint-2"
    shutil.copytree(tmp_path / "resumed" / "checkpoint-2", old)
    (old / "student_step_embedding.safetensors").unlink()  # as written before the student was told K
    fresh = make_trainer(tmp_path / "old", max_train_steps=4, tdm=TDMConfig(**UNIFY))
    with pytest.raises(ValueError, match="before the TDM-unify student was conditioned on K"):
        fresh.load_checkpoint(old)


def test_saved_files_carry_the_k_condition_and_sampling_with_it_is_the_trained_student(tmp_path):
    """On the digits backend: the trainer's student told K, and the student loaded from its saved
    file with c_K applied, sample the same digits for every trained K."""
    import peft  # noqa: F401  (the dev extra: a missing peft fails)
    import copy

    from safetensors import safe_open

    from tdm_train.backends.digits import DigitsBackend
    from tdm_train.demos.digits.data import NULL_CLASS, NUM_CLASSES
    from tdm_train.demos.digits.distill import load_student
    from tdm_train.demos.digits.teacher import SCHEDULER_CONFIG, load_teacher
    from tdm_train.lora.step_embedding import METADATA_KEY, StepConditions
    from tdm_train.sampler import tdm_sample
    from tdm_train.training.trainer import TDMTrainer, TrainConfig

    teacher = load_teacher()
    backend = DigitsBackend(copy.deepcopy(teacher), SCHEDULER_CONFIG, NULL_CLASS)
    config = TrainConfig(output_dir=str(tmp_path), max_train_steps=3, train_batch_size=8, learning_rate=1e-2,
                         lora_rank=2, lora_alpha=2, checkpointing_steps=3, seed=0, step_embedding_lr_ratio=10.0,
                         tdm=TDMConfig(**UNIFY))
    trainer = TDMTrainer(backend, {"class_labels": torch.arange(NUM_CLASSES)}, config)
    trainer.train(progress=False)
    vectors = trainer.student_step_embedding.vectors((1, 2, 4))
    assert all(float(v.abs().max()) > 1e-3 for v in vectors.values())  # a condition that changes the student
    for name in ("pytorch_lora_weights.safetensors", "tdm_lora_comfyui.safetensors"):
        conditions = StepConditions.read(tmp_path / name)
        assert conditions is not None and conditions.steps == [1, 2, 4]
        assert conditions.target == "time_embedding.linear_2"
        for k, v in vectors.items():
            torch.testing.assert_close(conditions.vector(k), v, rtol=0, atol=0)
        with safe_open(str(tmp_path / name), "pt") as f:
            assert METADATA_KEY in f.metadata()
    card = (tmp_path / "README.md").read_text()
    assert "sample with K in {1, 2, 4}" in card and "ignore these" in card
    saved = load_student(tmp_path / "pytorch_lora_weights.safetensors", teacher)
    gen = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(6, 1, 8, 8, generator=gen), torch.arange(6)
    trainer.backend.model.eval()
    outputs = {}
    for k in (1, 2, 4):
        grid = trainer.objective.grids[k]

        def trained(x, t, k=k):
            trainer.student.set_num_steps(torch.full((x.shape[0],), k))
            try:
                return trainer.student(x, t, {"class_labels": labels})
            finally:
                trainer.student.set_num_steps(None)

        with torch.no_grad():
            expected = tdm_sample(trained, noise, grid, trainer.backend.schedule)
        outputs[k] = saved.sample(noise, labels, k)
        torch.testing.assert_close(outputs[k], expected, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # without its condition the saved student is another network
            plain = tdm_sample(lambda x, t: saved(x, t, labels), noise, grid, trainer.backend.schedule)
        assert float((plain - expected).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="trained for \\[1, 2, 4\\] steps, not 3"):
        saved.sample(noise, labels, 3)
