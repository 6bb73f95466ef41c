"""LoRA roles as weight functions (w -> w + delta, ComfyUI's weight wrappers): the teacher is the
base exactly, the student/fake deltas match a hand-merged weight and peft's LoRA (outputs and
gradients), gradients land on the active adapter only, and the TDM trainer trains and resumes
exactly on them."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import diffusers  # noqa: F401

from test_trainer import tiny_conditions  # noqa: E402

from tdm_train.backends import RoleFunction, SDXLBackend  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_conditioning, tiny_sdxl_unet  # noqa: E402
from tdm_train.lora.weight_wrappers import LoraWeightDelta, WeightLoraRoles, lora_targets  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK, ALPHA = 4, 8.0  # scale 2: a wrong alpha / rank shows


def _attached(seed: int = 0, unet=None):
    unet = unet if unet is not None else tiny_sdxl_unet()
    roles = WeightLoraRoles(lora_targets(unet, TARGETS), RANK, ALPHA, generator=torch.Generator().manual_seed(seed))
    roles.attach(unet)
    return unet, roles


def _randomize_up(roles, seed: int = 1, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in ("student", "fake"):
            for wrapper in roles.wrappers.values():
                wrapper.up[adapter].copy_(scale * torch.randn(wrapper.up[adapter].shape, generator=gen))


def _inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(2)
    cond = tiny_sdxl_conditioning(batch)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([674, 449])[:batch], cond


def _run(unet, x, t, cond):
    return unet(x, t, **cond).sample


def _backend_cond(batch: int = 2):
    cond = tiny_sdxl_conditioning(batch)
    return {"prompt_embeds": cond["encoder_hidden_states"], **cond["added_cond_kwargs"]}


# ----------------------------------------------------------------------------- forward
def test_lora_targets_lists_the_attention_projections():
    unet = tiny_sdxl_unet()
    targets = lora_targets(unet, TARGETS)
    assert len(targets) > 0 and len(targets) % 4 == 0
    assert all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0") for name in targets)
    assert targets["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (64, 64)
    assert all(shape == tuple(unet.get_submodule(n).weight.shape) for n, shape in targets.items())
    assert lora_targets(unet, ("o_q",)) == {}  # whole path components only
    convs = lora_targets(unet, ("conv_in",))
    assert convs == {"conv_in": (32, 4, 3, 3)}


def test_teacher_is_the_base_exactly_and_the_student_is_the_hand_merged_weight():
    plain = tiny_sdxl_unet()
    unet, roles = _attached()
    x, t, cond = _inputs()
    with torch.no_grad():
        reference = _run(plain, x, t, cond)
        with roles.use("teacher"):
            assert torch.equal(_run(unet, x, t, cond), reference)
        with roles.use("student"):  # up == 0 at init: the student starts as the teacher
            assert torch.equal(_run(unet, x, t, cond), reference)
        _randomize_up(roles)
        with roles.use("student"):
            student = _run(unet, x, t, cond)
        with roles.use("fake"):
            fake = _run(unet, x, t, cond)
        merged = copy.deepcopy(plain)
        for name, wrapper in roles.wrappers.items():
            up, down = wrapper.up["student"], wrapper.down["student"]
            merged.get_submodule(name).weight += (ALPHA / RANK) * (up @ down).reshape(wrapper.shape)
        by_hand = _run(merged, x, t, cond)
    assert (student - reference).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(student, by_hand, rtol=0, atol=1e-5)
    assert (fake - student).abs().max() > 1e-3 and (fake - reference).abs().max() > 1e-3

    roles.detach(unet)
    assert not any(parametrize.is_parametrized(m) for m in unet.modules())
    lora_ids = {id(p) for a in ("student", "fake") for p in roles.parameters(a)}
    assert not lora_ids & {id(p) for p in unet.parameters()}
    with torch.no_grad():
        assert torch.equal(_run(unet, x, t, cond), reference)  # the base weights are untouched


def test_conv_weights_get_a_reshaped_delta():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.SiLU(), torch.nn.Linear(8, 6))
    targets = lora_targets(model, ("0", "2"))
    assert targets == {"0": (5, 3, 3, 3), "2": (6, 8)}
    roles = WeightLoraRoles(targets, 2, 3.0)
    assert roles.wrappers["0"].down["fake"].shape == (2, 27) and roles.wrappers["0"].up["fake"].shape == (5, 2)
    _randomize_up(roles, scale=0.5)
    x = torch.randn(2, 3, 8, 8)
    plain = copy.deepcopy(model)
    roles.attach(model)
    with torch.no_grad(), roles.use("fake"):
        out = model(x)
        conv, lin = roles.wrappers["0"], roles.wrappers["2"]
        w0 = plain[0].weight + 1.5 * (conv.up["fake"] @ conv.down["fake"]).reshape(5, 3, 3, 3)
        w2 = plain[2].weight + 1.5 * lin.up["fake"] @ lin.down["fake"]
        expected = torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.conv2d(x, w0, plain[0].bias, padding=1)), w2, plain[2].bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already attached"):
        roles.attach(model)
    with pytest.raises(ValueError, match="weight shape"):
        WeightLoraRoles({"0": (5, 3, 1, 1)}, 2, 2.0).attach(plain)


# ----------------------------------------------------------------------------- gradients
def _clear_grads(roles):
    for adapter in ("student", "fake"):
        for p in roles.parameters(adapter):
            p.grad = None


def test_gradients_reach_the_active_adapter_only():
    unet, roles = _attached()
    _randomize_up(roles)
    x, t, cond = _inputs()
    for role, other in (("student", "fake"), ("fake", "student")):
        _clear_grads(roles)
        with roles.use(role):
            _run(unet, x, t, cond).square().mean().backward()
        grads = [p.grad for p in roles.parameters(role)]
        assert all(g is not None for g in grads) and all(g.abs().max() > 0 for g in grads)
        assert all(p.grad is None for p in roles.parameters(other))
    _clear_grads(roles)
    x = x.clone().requires_grad_(True)
    with roles.use("teacher"):
        _run(unet, x, t, cond).square().mean().backward()
    assert x.grad is not None
    assert all(p.grad is None for a in ("student", "fake") for p in roles.parameters(a))
    lora_ids = {id(p) for a in ("student", "fake") for p in roles.parameters(a)}
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters() if id(p) not in lora_ids)


def _role_setup(checkpointing: bool):
    unet, roles = _attached()
    _randomize_up(roles)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    backend = SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=64)
    x, t, _ = _inputs()
    return roles, backend, _backend_cond(), x, t


def _student_grads(roles):
    return [None if p.grad is None else p.grad.clone() for p in roles.parameters("student")]


def _reference_grads():
    roles, backend, cond, x, t = _role_setup(False)
    with torch.no_grad():
        with roles.use("teacher"):
            f_teacher = backend.x0(x, t, cond)
        with roles.use("fake"):
            f_fake = backend.x0(x, t, cond)
    with roles.use("student"):
        x0 = backend.x0(x, t, cond)
        ((x0 - (x0.detach() + f_teacher - f_fake)) ** 2).mean().backward()
    return _student_grads(roles)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_student_gradients_are_exact_with_roles_switching_in_between(checkpointing):
    reference = _reference_grads()
    roles, backend, cond, x, t = _role_setup(checkpointing)
    student, teacher, fake = (RoleFunction(backend, roles, r) for r in ("student", "teacher", "fake"))
    with roles.use("student"):
        x0 = student(x, t, cond)  # the TDM order: the student's forward first, then the others
        with torch.no_grad():
            f_teacher, f_fake = teacher(x, t, cond), fake(x, t, cond)
        ((x0 - (x0.detach() + f_teacher - f_fake)) ** 2).mean().backward()
    grads = _student_grads(roles)
    assert len(grads) == len(reference) > 0 and all(g is not None for g in grads)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in roles.parameters("fake"))


def test_the_trap_is_real_with_checkpointing_and_no_role_restoration():
    """A role left switched between forward and backward: checkpointing recomputes the weights
    as the fake score, and the student's gradients come out wrong. What use() prevents."""
    reference = _reference_grads()
    roles, backend, cond, x, t = _role_setup(True)
    roles.activate("student")
    x0 = backend.x0(x, t, cond)
    roles.activate("fake")
    with torch.no_grad():
        f_fake = backend.x0(x, t, cond)
    ((x0 - (x0.detach() - f_fake)) ** 2).mean().backward()
    grads = _student_grads(roles)
    assert any(g is None for g in grads) or any(not torch.allclose(g, r, rtol=1e-4, atol=1e-7)
                                                for g, r in zip(grads, reference))


# ----------------------------------------------------------------------------- switching
def test_use_restores_the_role_after_nesting_and_exceptions():
    roles = WeightLoraRoles({"a": (3, 2), "b": (4, 3, 1, 1)}, 2, 2.0)
    student, fake = roles.parameters("student"), roles.parameters("fake")
    assert roles.role == "student" and len(student) == len(fake) == 4
    assert not {id(p) for p in student} & {id(p) for p in fake}
    assert student == roles.parameters("student")  # a stable order
    assert all(p.requires_grad for p in student) and not any(p.requires_grad for p in fake)
    with roles.use("fake"):
        assert roles.role == "fake" and all(p.requires_grad for p in fake) and not any(p.requires_grad for p in student)
        with roles.use("teacher"):
            assert roles.role == "teacher" and not any(p.requires_grad for p in student + fake)
        assert roles.role == "fake" and all(p.requires_grad for p in fake)
    assert roles.role == "student" and all(p.requires_grad for p in student)
    with pytest.raises(RuntimeError, match="boom"):
        with roles.use("teacher"):
            with roles.use("fake"):
                raise RuntimeError("boom")
    assert roles.role == "student" and all(p.requires_grad for p in student)
    for bad in ("ema", "Student", None):
        with pytest.raises(ValueError, match="role"):
            roles.activate(bad)
        with pytest.raises(ValueError, match="role"):
            with roles.use(bad):
                pass
    assert roles.role == "student"
    for call in (roles.parameters, roles.state_dict, lambda a: roles.load_state_dict(a, {})):
        with pytest.raises(ValueError, match="adapter"):
            call("teacher")
    with pytest.raises(ValueError, match="no LoRA target"):
        WeightLoraRoles({}, 2, 2.0)


# ----------------------------------------------------------------------------- peft parity
def test_matches_peft_lora_outputs_and_gradients():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tdm_train.training.roles import AdapterRoles, lora_config

    peft_unet = tiny_sdxl_unet()
    peft_roles = AdapterRoles(peft_unet, lora_config(RANK, ALPHA, TARGETS))
    unet, roles = _attached(seed=5)
    peft_layers = {n for n, m in peft_unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert peft_layers == set(roles.wrappers)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, wrapper in roles.wrappers.items():
            layer = peft_unet.get_submodule(name)
            for adapter in ("student", "fake"):
                lora_b = layer.lora_B[adapter].weight
                lora_b.copy_(0.05 * torch.randn(lora_b.shape, generator=gen))
                wrapper.down[adapter].copy_(layer.lora_A[adapter].weight)
                wrapper.up[adapter].copy_(lora_b)
    ours = SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=64)
    theirs = SDXLBackend(peft_unet, SDXL_SCHEDULER_CONFIG, resolution=64)
    x, t, _ = _inputs()
    t = torch.tensor([449, 224])
    cond = _backend_cond()
    outputs = {}
    with torch.no_grad():
        for role in ("teacher", "student", "fake"):
            with roles.use(role), peft_roles.use(role):
                outputs[role] = ours.x0(x, t, cond)
                torch.testing.assert_close(outputs[role], theirs.x0(x, t, cond), rtol=0, atol=1e-5)
    assert (outputs["student"] - outputs["teacher"]).abs().max() > 1e-3
    assert (outputs["fake"] - outputs["student"]).abs().max() > 1e-3

    target = torch.randn(outputs["teacher"].shape, generator=gen)
    for role_set, backend in ((roles, ours), (peft_roles, theirs)):
        with role_set.use("student"):
            ((backend.x0(x, t, cond) - target) ** 2).mean().backward()
    checked = 0
    for name, wrapper in roles.wrappers.items():
        layer = peft_unet.get_submodule(name)
        for ours_p, theirs_p in ((wrapper.down["student"], layer.lora_A["student"].weight),
                                 (wrapper.up["student"], layer.lora_B["student"].weight)):
            assert ours_p.grad is not None and theirs_p.grad is not None
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, rtol=1e-4, atol=1e-5)
            checked += int(theirs_p.grad.abs().max() > 1e-6)
        assert wrapper.down["fake"].grad is None and layer.lora_A["fake"].weight.grad is None
    assert checked > len(roles.wrappers)  # the gradients compared are not all zero


def test_initialisation_is_peft_like_and_seeded():
    a = WeightLoraRoles({"w": (16, 64)}, 8, 8.0, generator=torch.Generator().manual_seed(0))
    b = WeightLoraRoles({"w": (16, 64)}, 8, 8.0, generator=torch.Generator().manual_seed(0))
    c = WeightLoraRoles({"w": (16, 64)}, 8, 8.0, generator=torch.Generator().manual_seed(1))
    down = a.wrappers["w"].down["student"]
    assert torch.equal(down, b.wrappers["w"].down["student"]) and not torch.equal(down, c.wrappers["w"].down["student"])
    assert not torch.equal(down, a.wrappers["w"].down["fake"])  # two independent adapters
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert down.abs().max() <= bound and down.abs().max() > 0.8 * bound
    assert all(w.up[ad].abs().max() == 0 and w.up[ad].dtype == torch.float32
               for w in a.wrappers.values() for ad in ("student", "fake"))


# ----------------------------------------------------------------------------- state and dtypes
def test_state_dict_round_trip_and_errors():
    roles = WeightLoraRoles({"blk.to_q": (6, 4), "blk.conv": (6, 4, 3, 3)}, 2, 2.0,
                            generator=torch.Generator().manual_seed(0))
    _randomize_up(roles)
    state = roles.state_dict("student")
    assert set(state) == {"blk.to_q.lora_down.weight", "blk.to_q.lora_up.weight",
                          "blk.conv.lora_down.weight", "blk.conv.lora_up.weight"}
    assert state["blk.conv.lora_down.weight"].shape == (2, 36) and state["blk.conv.lora_up.weight"].shape == (6, 2)
    assert all(not v.requires_grad for v in state.values())
    state["blk.to_q.lora_up.weight"] += 1  # a clone: the parameter is unchanged
    assert not torch.equal(state["blk.to_q.lora_up.weight"], roles.wrappers["blk.to_q"].up["student"])
    state = roles.state_dict("student")

    other = WeightLoraRoles({"blk.to_q": (6, 4), "blk.conv": (6, 4, 3, 3)}, 2, 2.0,
                            generator=torch.Generator().manual_seed(9))
    other.activate("fake")
    for p in other.parameters("student"):
        p.requires_grad_(True)  # whatever flags a caller left, loading re-applies the role's
    before = other.state_dict("fake")
    other.load_state_dict("student", state)
    for key, value in other.state_dict("student").items():
        assert torch.equal(value, state[key])
    for key, value in other.state_dict("fake").items():
        assert torch.equal(value, before[key])
    assert other.role == "fake" and not any(p.requires_grad for p in other.parameters("student"))
    assert all(p.requires_grad for p in other.parameters("fake"))

    untouched = other.state_dict("fake")
    missing = dict(state)
    del missing["blk.conv.lora_up.weight"]
    with pytest.raises(ValueError, match="missing.*blk.conv.lora_up.weight"):
        other.load_state_dict("fake", missing)
    with pytest.raises(ValueError, match="unexpected.*blk.extra"):
        other.load_state_dict("fake", {**state, "blk.extra.lora_up.weight": torch.zeros(1)})
    wrong = {k: v + 1 for k, v in state.items()}
    wrong["blk.conv.lora_down.weight"] = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict("fake", wrong)
    for key, value in other.state_dict("fake").items():  # nothing of a rejected state was loaded
        assert torch.equal(value, untouched[key])


def test_cast_adapters_and_to_keep_the_parameter_objects():
    roles = WeightLoraRoles({"w": (6, 4)}, 2, 2.0)
    params = roles.parameters("student") + roles.parameters("fake")
    roles.cast_adapters(torch.bfloat16)
    assert [id(p) for p in roles.parameters("student") + roles.parameters("fake")] == [id(p) for p in params]
    assert all(p.dtype == torch.bfloat16 for p in params)
    roles.cast_adapters()
    assert all(p.dtype == torch.float32 for p in params)
    assert roles.to("cpu") is roles and all(p.device.type == "cpu" for p in params)
    assert all(p.requires_grad for p in roles.parameters("student"))


def test_bf16_base_with_fp32_adapters():
    unet = tiny_sdxl_unet().to(torch.bfloat16)
    unet, roles = _attached(unet=unet)
    _randomize_up(roles)
    assert all(p.dtype == torch.float32 for a in ("student", "fake") for p in roles.parameters(a))
    x, t, cond = _inputs()
    x = x.to(torch.bfloat16)
    cond = {"encoder_hidden_states": cond["encoder_hidden_states"].to(torch.bfloat16),
            "added_cond_kwargs": {k: v.to(torch.bfloat16) for k, v in cond["added_cond_kwargs"].items()}}
    with torch.no_grad(), roles.use("teacher"):
        teacher = _run(unet, x, t, cond)
    with roles.use("student"):
        student = _run(unet, x, t, cond)
        assert student.dtype == torch.bfloat16
        student.float().square().mean().backward()
    assert (student.detach().float() - teacher.float()).abs().max() > 1e-2
    grads = [p.grad for p in roles.parameters("student")]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max() for g in grads) > 0
    assert all(p.grad is None for p in roles.parameters("fake"))
    wrapper = next(iter(roles.wrappers.values()))
    weight = torch.randn(wrapper.shape).to(torch.bfloat16)
    with roles.use("fake"):
        out = wrapper(weight)
    assert out.dtype == torch.bfloat16
    expected = (weight.float() + wrapper.delta("fake").detach()).to(torch.bfloat16)  # one rounding
    assert torch.equal(out.detach(), expected)


def test_a_standalone_delta_reads_its_roles_object():
    class Roles:
        role = "teacher"

    roles = Roles()
    delta = LoraWeightDelta((3, 2), 1, 2.0, roles)
    assert "roles" not in dict(delta.named_children())
    with torch.no_grad():
        delta.up["student"].fill_(1.0)
    weight = torch.randn(3, 2)
    assert delta(weight) is weight
    roles.role = "student"
    torch.testing.assert_close(delta(weight), weight + 2.0 * delta.up["student"] @ delta.down["student"])
    roles.role = "fake"
    assert torch.equal(delta(weight), weight)  # the fake's up is still zero


# ----------------------------------------------------------------------------- the trainer
def _trainer(output_dir, **overrides):
    import accelerate  # noqa: F401
    from tdm_train.distill import TDMConfig
    from tdm_train.training.trainer import TDMTrainer, TrainConfig

    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    backend = SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=16)
    roles = WeightLoraRoles(lora_targets(unet, backend.default_lora_targets), 4, 4,
                            generator=torch.Generator().manual_seed(0))
    roles.attach(unet)
    settings = dict(output_dir=str(output_dir), max_train_steps=4, train_batch_size=2, learning_rate=1e-3,
                    lora_rank=4, lora_alpha=4, checkpointing_steps=1, seed=0, tdm=TDMConfig(guidance_scale=2.0))
    settings.update(overrides)
    return TDMTrainer(backend, tiny_conditions(), TrainConfig(**settings), roles=roles)


def test_trainer_trains_injected_weight_roles(tmp_path):
    trainer = _trainer(tmp_path, max_train_steps=2)
    assert isinstance(trainer.roles, WeightLoraRoles)
    lora_ids = {id(p) for a in ("student", "fake") for p in trainer.roles.parameters(a)}
    base = {n: p.detach().clone() for n, p in trainer.backend.model.named_parameters() if id(p) not in lora_ids}
    before = {a: trainer.roles.state_dict(a) for a in ("student", "fake")}
    for _ in range(2):
        log = trainer.train_step()
        assert torch.isfinite(torch.tensor([log["generator_loss"], log["fake_loss"]])).all()
        assert log["generator_grad_norm"] is not None and not log.get("skipped_nonfinite")
    for adapter in ("student", "fake"):
        after = trainer.roles.state_dict(adapter)
        assert max((after[k] - before[adapter][k]).abs().max() for k in after) > 0
    assert base and all(torch.equal(p, base[n]) for n, p in trainer.backend.model.named_parameters() if n in base)
    assert trainer.roles.role == "student"


def test_trainer_resumes_exactly_on_weight_roles(tmp_path):
    straight = _trainer(tmp_path / "straight")
    for _ in range(4):
        straight.train_step()

    first_half = _trainer(tmp_path / "resumed")
    for _ in range(2):
        first_half.train_step()
    path = first_half.save_checkpoint()
    assert path.name == "checkpoint-2" and (path / "student.safetensors").is_file()
    second_half = _trainer(tmp_path / "resumed")
    second_half.load_checkpoint(path)
    assert second_half.step == 2
    for _ in range(2):
        second_half.train_step()
    assert second_half.step == 4
    for adapter in ("student", "fake"):
        a, b = straight.roles.state_dict(adapter), second_half.roles.state_dict(adapter)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert straight.optimizers["student"].state_dict()["state"][0]["step"] == \
        second_half.optimizers["student"].state_dict()["state"][0]["step"]
