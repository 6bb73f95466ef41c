"""One base, three roles: the student's gradients are exact whatever runs between its forward
and its backward, with and without gradient checkpointing."""

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from peft.functional import set_adapter  # noqa: E402

from tdm_train.backends import RoleFunction, SDXLBackend  # noqa: E402
from tdm_train.training.roles import AdapterRoles, lora_config  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_conditioning, tiny_sdxl_unet  # noqa: E402


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
    """A plain peft set_adapter between forward and backward breaks the student's gradients:
    None without checkpointing, wrong values with it. This is what the roles guard against."""
    reference, _, _ = _reference_grads()
    roles, backend, cond, x_t, t = _setup(checkpointing)
    roles.activate("student")
    x0 = backend.x0(x_t, t, cond)
    with torch.no_grad():
        set_adapter(roles.model, "fake")
        f_fake = backend.x0(x_t, t, cond)
    ((x0 - (x0.detach() - f_fake)) ** 2).mean().backward()
    grads = _student_grads(roles)
    broken = any(g is None for g in grads) or any(not torch.allclose(g, r, rtol=1e-4, atol=1e-7)
                                                  for g, r in zip(grads, reference))
    assert broken


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
