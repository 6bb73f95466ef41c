"""One base, three roles: the student's gradients are exact whatever runs between its forward
and its backward, with and without gradient checkpointing."""

import pytest
import torch


from tdm_train.backends import RoleFunction, SDXLBackend
from tdm_train.training.roles import AdapterRoles, activate_with_peft, lora_config
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_conditioning, tiny_sdxl_unet


def _setup(checkpointing: bool):
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    roles = AdapterRoles(unet, lora_config(4, 4, ("to_q", "to_k", "to_v", "to_out.0")))
    gen = torch.Generator().manual_seed(1)
    for adapter in ("student", "fake"):  # non-zero LoRA so every role computes something different
        for p in roles.parameters(adapter):
            p.data = 0.05 * torch.randn(p.shape, generator=gen)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    backend = SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=128)
    cond = tiny_sdxl_conditioning(2)
    cond = {"prompt_embeds": cond["encoder_hidden_states"], **cond["added_cond_kwargs"]}
    x_t = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([674, 449])
    return roles, backend, cond, x_t, t


def _student_grads(roles):
    return [None if p.grad is None else p.grad.clone() for p in roles.parameters("student")]


def _reference_grads():
    """Safe order, no checkpointing: teacher and fake first, then the student forward + backward."""
    roles, backend, cond, x_t, t = _setup(checkpointing=False)
    with torch.no_grad():
        with roles.use("teacher"):
            f_teacher = backend.x0(x_t, t, cond)
        with roles.use("fake"):
            f_fake = backend.x0(x_t, t, cond)
    with roles.use("student"):
        x0 = backend.x0(x_t, t, cond)
        ((x0 - (x0.detach() + f_teacher - f_fake)) ** 2).mean().backward()
    return _student_grads(roles), f_teacher, f_fake


@pytest.mark.parametrize("checkpointing", [False, True])
def test_student_gradients_are_exact_with_roles_switching_in_between(checkpointing):
    reference, f_teacher_ref, f_fake_ref = _reference_grads()
    roles, backend, cond, x_t, t = _setup(checkpointing)
    student, teacher, fake = (RoleFunction(backend, roles, r) for r in ("student", "teacher", "fake"))
    with roles.use("student"):
        x0 = student(x_t, t, cond)  # forward with grad first (the TDM order) ...
        with torch.no_grad():  # ... then the teacher and the fake score, as the objective does
            f_teacher, f_fake = teacher(x_t, t, cond), fake(x_t, t, cond)
        ((x0 - (x0.detach() + f_teacher - f_fake)) ** 2).mean().backward()
    torch.testing.assert_close(f_teacher, f_teacher_ref)
    torch.testing.assert_close(f_fake, f_fake_ref)
    assert (f_teacher - f_fake).abs().max() > 1e-4  # the roles really differ
    grads = _student_grads(roles)
    assert len(grads) == len(reference) > 0 and all(g is not None for g in grads)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in roles.parameters("fake"))
    assert all(not p.requires_grad for name, p in roles.model.named_parameters() if "lora_" not in name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_trap_is_real_without_role_restoration(checkpointing):
    """The computation of the reference, in the TDM order (student forward first), once with the
    teacher/fake switches left in place until backward() and once restored by roles.use. The naive
    order gives no student gradients at all: the fake role froze the student's LoRA, and under
    checkpointing the forward is recomputed as the fake score, with the student still frozen. The
    restored order gives the reference exactly. Both runs compute the reference's target (checked),
    so only the role handling differs between them."""
    reference, f_teacher_ref, f_fake_ref = _reference_grads()
    grads = {}
    for mode in ("naive", "restored"):
        roles, backend, cond, x_t, t = _setup(checkpointing)
        with roles.use("student"):
            x0 = backend.x0(x_t, t, cond)
            with torch.no_grad():
                if mode == "naive":
                    roles.activate("teacher")
                    f_teacher = backend.x0(x_t, t, cond)
                    roles.activate("fake")
                    f_fake = backend.x0(x_t, t, cond)
                else:
                    with roles.use("teacher"):
                        f_teacher = backend.x0(x_t, t, cond)
                    with roles.use("fake"):
                        f_fake = backend.x0(x_t, t, cond)
            torch.testing.assert_close(f_teacher, f_teacher_ref)  # the roles really switched ...
            torch.testing.assert_close(f_fake, f_fake_ref)  # ... so the target is the reference's
            pairs = ((x0.detach(), f_teacher), (x0.detach(), f_fake), (f_teacher, f_fake))
            assert min(float((a - b).abs().max()) for a, b in pairs) > 1e-4  # the three roles really differ
            assert roles.role == ("fake" if mode == "naive" else "student")
            ((x0 - (x0.detach() + f_teacher - f_fake)) ** 2).mean().backward()
        grads[mode] = _student_grads(roles)
    assert len(reference) > 0 and all(g is not None for g in reference)
    assert all(g is None for g in grads["naive"]), "the naive order still reached the student's LoRA"
    for g, r in zip(grads["restored"], reference):
        assert g is not None
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def _switch_state(model) -> tuple:
    """What a role switch sets: every parameter's requires_grad, each tuner layer's active adapter
    and disable flag."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = tuple((name, p.requires_grad) for name, p in model.named_parameters())
    layers = tuple((name, list(m.active_adapters), m.disable_adapters) for name, m in model.named_modules()
                   if isinstance(m, BaseTunerLayer))
    return flags, layers


def test_cached_switch_sets_exactly_what_peft_sets():
    """AdapterRoles.activate (cached layers, flags set directly) against peft's set_adapter /
    enable_adapters walking the model (activate_with_peft), on two identical models, through every
    transition: the same flags on every parameter and layer, the active adapter's parameters are
    exactly the trainable ones, and the same outputs."""
    ours, backend, cond, x_t, t = _setup(False)
    peft_roles, peft_backend, _, _, _ = _setup(False)
    assert _switch_state(ours.model) == _switch_state(peft_roles.model)
    sequence = ["fake", "student", "teacher", "fake", "teacher", "student", "fake", "student", "teacher"]
    outputs = {}
    for role in sequence:
        ours.activate(role)
        activate_with_peft(peft_roles.model, role)
        assert ours.role == role
        assert _switch_state(ours.model) == _switch_state(peft_roles.model), role
        trainable = {id(p) for p in ours.model.parameters() if p.requires_grad}
        assert trainable == ({id(p) for p in ours.parameters(role)} if role != "teacher" else set()), role
        with torch.no_grad():
            out = backend.x0(x_t, t, cond)
            torch.testing.assert_close(out, peft_backend.x0(x_t, t, cond), rtol=0, atol=0)
        outputs.setdefault(role, out)
        torch.testing.assert_close(out, outputs[role], rtol=0, atol=0)
    assert min(float((outputs[a] - outputs[b]).abs().max()) for a, b in
               (("teacher", "student"), ("teacher", "fake"), ("student", "fake"))) > 1e-4


def test_the_adapter_initialisation_follows_the_seed():
    """The same seed gives the same initial LoRA whatever the global RNG holds, another seed
    another one, and the global RNG is left as it was."""
    def initial(seed, global_seed):
        torch.manual_seed(global_seed)
        unet = tiny_sdxl_unet()  # draws from the global RNG itself: the same base every time
        before = torch.get_rng_state()
        roles = AdapterRoles(unet, lora_config(4, 4, ("to_q", "to_v")), seed=seed)
        assert torch.equal(torch.get_rng_state(), before)
        return [p.detach().clone() for a in ("student", "fake") for p in roles.parameters(a)]

    a, b, c = initial(5, 0), initial(5, 1), initial(6, 0)
    assert len(a) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_role_names_and_adapter_parameters():
    roles, _, _, _, _ = _setup(False)
    assert roles.role == "student"
    with pytest.raises(ValueError, match="role"):
        roles.activate("ema")
    student, fake = roles.parameters("student"), roles.parameters("fake")
    assert len(student) == len(fake) > 0 and not {id(p) for p in student} & {id(p) for p in fake}
    with roles.use("teacher"):
        assert roles.role == "teacher" and not any(p.requires_grad for p in student + fake)
    assert roles.role == "student" and all(p.requires_grad for p in student)
    state = roles.state_dict("fake")
    assert state and all(".fake." not in k for k in state)
    roles.load_state_dict("student", state)
    torch.testing.assert_close(roles.state_dict("student")[next(iter(state))], state[next(iter(state))])


def test_the_trainer_seeds_the_adapters_from_its_config(tmp_path):
    """TDMTrainer's LoRA initialisation is a function of config.seed alone, whatever state the
    global RNG is in when the trainer is built."""
    from test_trainer import tiny_conditions

    from tdm_train.training.trainer import SingleProcess, TDMTrainer, TrainConfig

    def initial(global_seed, seed):
        unet = tiny_sdxl_unet()
        torch.manual_seed(global_seed)
        config = TrainConfig(output_dir=str(tmp_path), lora_rank=4, lora_alpha=4, seed=seed)
        trainer = TDMTrainer(SDXLBackend(unet, SDXL_SCHEDULER_CONFIG, resolution=64), tiny_conditions(), config,
                             SingleProcess("cpu"))
        return {f"{a}.{k}": v for a in ("student", "fake") for k, v in trainer.roles.state_dict(a).items()}

    a, b, c = initial(0, 7), initial(1, 7), initial(0, 8)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
