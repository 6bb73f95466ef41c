"""Teacher, student and fake score over one frozen base, with each LoRA'd weight computed by a
*weight function* ``w -> w + delta`` instead of peft's extra branch around a layer.

Why: this is how ComfyUI hosts trainable adapters. ``ModelPatcher.add_weight_wrapper(key, f)``
registers ``f`` for one weight, and ComfyUI's layers compute ``weight = f(weight)`` for every
registered function right before their matmul. ComfyUI's UNet is not a diffusers model and peft
cannot be injected into it, but any module that maps a weight to a weight can be registered.
This module does not import comfy: :class:`LoraWeightDelta` is that function (one per weight),
and :class:`WeightLoraRoles` is the role switch over all of them, with the same interface as
:class:`~tdm_train.training.roles.AdapterRoles`, so ``TDMTrainer(..., roles=WeightLoraRoles(...))`` trains
it unchanged. For plain torch models (tests, any ``nn.Module``) :meth:`WeightLoraRoles.attach`
registers the same functions as ``torch.nn.utils.parametrize`` parametrizations, which is the
same mechanism: ``module.weight`` is recomputed through the function on every access.

The role-switch/backward trap of roles.py applies the same way: each delta reads the active role
when the weight is *computed*, and gradient checkpointing recomputes it during ``backward()``. A
role switch left in place between the student's forward and its backward therefore gives wrong
student gradients (or none). :meth:`WeightLoraRoles.use` restores the previous role on exit, so

    with roles.use("student"):
        loss = objective.generator_loss(student, teacher, fake, ...)  # teacher/fake calls nest
        loss.backward()

backpropagates with the student active, whatever ran in between.

Dtypes: the LoRA parameters stay float32 (``cast_adapters``) while the base may be fp16/bf16;
the delta is added in the wider of the two dtypes and the sum rounded once to the weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..training.roles import ADAPTERS, ROLES, RoleSwitch

LORA_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraWeightDelta(nn.Module):
    """``weight -> weight + (alpha / rank) * (up @ down).reshape(weight.shape)`` of the active
    adapter; the weight itself, untouched, in the teacher role.

    For a base weight of shape ``[out, in, *kernel]`` each adapter ("student", "fake") has
    ``down[adapter]`` of shape ``[rank, in * prod(kernel)]`` and ``up[adapter]`` of shape
    ``[out, rank]``, float32, initialised as peft does (down: kaiming-uniform with a = sqrt(5),
    up: zeros), so the student and the fake score start exactly as the teacher.

    ``roles`` is only read for its active role; it is a plain reference, not a submodule.
    """

    def __init__(self, shape: Sequence[int], rank: int, alpha: float, roles, device=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"a LoRA'd weight needs at least 2 dims [out, in, *kernel], got shape {shape}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.shape = shape
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.roles = roles
        fan_in = math.prod(shape[1:])
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for adapter in ADAPTERS:
            down = torch.empty(self.rank, fan_in, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            self.down[adapter] = nn.Parameter(down)
            self.up[adapter] = nn.Parameter(torch.zeros(shape[0], self.rank, device=device, dtype=torch.float32))

    def delta(self, adapter: str) -> torch.Tensor:
        """The adapter's weight delta, in the parameters' dtype and device."""
        return ((self.up[adapter] @ self.down[adapter]) * self.scale).reshape(self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        role = self.roles.role
        if role == "teacher" or role is None:
            return weight
        delta = self.delta(role).to(weight.device)
        dtype = torch.promote_types(weight.dtype, delta.dtype)
        return (weight.to(dtype) + delta.to(dtype)).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.rank}, alpha={self.alpha}"


def lora_targets(model: nn.Module, suffixes: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` of the Linear and Conv modules whose path is one of
    ``suffixes`` or ends with ``"." + suffix`` (peft's matching: "to_q" matches
    "...attn1.to_q", not "...add_to_q"), in the model's module order."""
    suffixes = tuple(suffixes)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, LORA_MODULE_TYPES):
            continue
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if parametrize.is_parametrized(module, "weight"):
            shape = module.parametrizations.weight.original.shape
        else:
            shape = module.weight.shape
        found[name] = tuple(shape)
    return found


class WeightLoraRoles(RoleSwitch):
    """The three roles of TDM over one frozen base whose LoRA'd weights go through
    :class:`LoraWeightDelta` functions (one per key of ``weight_shapes``).

    The same interface as :class:`~tdm_train.training.roles.AdapterRoles`: ``role``, ``activate``,
    ``use``, ``parameters``, ``state_dict``, ``load_state_dict``, ``cast_adapters``. It starts in
    the student role. The wrappers are hosted by the caller: ComfyUI registers
    ``roles.wrappers[name]`` with ``ModelPatcher.add_weight_wrapper``; a plain torch model gets
    them from :meth:`attach`.
    """

    def __init__(self, weight_shapes: Mapping[str, Sequence[int]], rank: int, alpha: float, device=None,
                 generator: torch.Generator | None = None):
        if not weight_shapes:
            raise ValueError("no LoRA target weights given (weight_shapes is empty)")
        self.rank, self.alpha = int(rank), float(alpha)
        self.wrappers: dict[str, LoraWeightDelta] = {
            name: LoraWeightDelta(shape, rank, alpha, self, device=device, generator=generator)
            for name, shape in weight_shapes.items()
        }
        # each adapter's parameters, listed once: a switch then only sets flags (the parameter
        # objects never change: loading copies into them, casting replaces their .data)
        self._params: dict[str, list[nn.Parameter]] = {
            adapter: [p for w in self.wrappers.values() for p in (w.down[adapter], w.up[adapter])]
            for adapter in ADAPTERS
        }
        self._role: str | None = None
        self.activate("student")

    # -------------------------------------------------------------- switching
    def activate(self, role: str) -> None:
        """Make ``role`` the one the next weight computation runs as: its adapter trainable, the
        other frozen (teacher: both frozen)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        for adapter in ADAPTERS:
            flag = adapter == role
            for p in self._params[adapter]:
                p.requires_grad = flag
        self._role = role

    # -------------------------------------------------------------- parameters
    @staticmethod
    def _check_adapter(adapter: str) -> None:
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")

    def parameters(self, adapter: str) -> list[nn.Parameter]:
        """The LoRA parameters of one adapter, whatever role is active: ``down, up`` of each
        wrapper in ``weight_shapes`` order (stable, so optimizer states load back)."""
        self._check_adapter(adapter)
        return list(self._params[adapter])

    def state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """``{f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}``, detached clones,
        with the parameters' shapes (down [rank, in * prod(kernel)], up [out, rank])."""
        self._check_adapter(adapter)
        state = {}
        for name, wrapper in self.wrappers.items():
            state[f"{name}.lora_down.weight"] = wrapper.down[adapter].detach().clone()
            state[f"{name}.lora_up.weight"] = wrapper.up[adapter].detach().clone()
        return state

    def load_state_dict(self, adapter: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`state_dict` gave: exactly its keys and shapes (else ValueError, and
        nothing is loaded), cast to the parameters' dtype and device."""
        self._check_adapter(adapter)
        params = {}
        for name, wrapper in self.wrappers.items():
            params[f"{name}.lora_down.weight"] = wrapper.down[adapter]
            params[f"{name}.lora_up.weight"] = wrapper.up[adapter]
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if missing or unexpected:
            raise ValueError(f"state for adapter {adapter!r} does not match: {len(missing)} missing keys "
                             f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}")
        wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(p.shape)}" for k, p in params.items()
                 if tuple(state[k].shape) != tuple(p.shape)]
        if wrong:
            raise ValueError(f"{len(wrong)} shape mismatches for adapter {adapter!r}: {wrong[:4]}")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(state[key].to(device=p.device, dtype=p.dtype))
        self.activate(self._role)  # the role's requires_grad flags, whatever the caller did

    def cast_adapters(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep the LoRA parameters in ``dtype`` (float32 when the base runs in fp16/bf16). The
        parameter objects stay the same (optimizers keep working)."""
        for adapter in ADAPTERS:
            for p in self.parameters(adapter):
                p.data = p.data.to(dtype)

    def to(self, device) -> WeightLoraRoles:
        """Move the LoRA parameters to ``device`` (the parameter objects stay the same)."""
        for adapter in ADAPTERS:
            for p in self.parameters(adapter):
                p.data = p.data.to(device)
        return self

    # -------------------------------------------------------------- plain torch models
    def attach(self, model: nn.Module) -> nn.Module:
        """Compute each target's ``weight`` through its wrapper: a torch parametrization on
        ``model.get_submodule(name)`` (unsafe=True: the function is not probed at registration).
        Freezes the base first (every parameter of ``model`` that is no LoRA parameter), as
        AdapterRoles does. The wrappers then are submodules of ``model``: a later ``model.to(dtype)``
        casts them too (call :meth:`cast_adapters` after it)."""
        modules = {}
        for name, wrapper in self.wrappers.items():
            module = model.get_submodule(name)
            if parametrize.is_parametrized(module, "weight"):
                if any(p is wrapper for p in module.parametrizations.weight):
                    raise ValueError(f"{name}: this LoRA is already attached")
                shape = module.parametrizations.weight.original.shape
            elif isinstance(getattr(module, "weight", None), torch.Tensor):
                shape = module.weight.shape
            else:
                raise ValueError(f"{name}: {type(module).__name__} has no weight tensor")
            if tuple(shape) != wrapper.shape:
                raise ValueError(f"{name}: weight shape {tuple(shape)} != the LoRA's {wrapper.shape}")
            modules[name] = module
        model.requires_grad_(False)
        for name, module in modules.items():
            parametrize.register_parametrization(module, "weight", self.wrappers[name], unsafe=True)
        self.activate(self._role)
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`attach`: the modules get their plain base weights back (the LoRA is not
        merged into them); other parametrizations of the same weights are kept."""
        for name, wrapper in self.wrappers.items():
            module = model.get_submodule(name)
            if not parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"{name}: this LoRA is not attached")
            chain = module.parametrizations.weight
            index = next((i for i, p in enumerate(chain) if p is wrapper), None)
            if index is None:
                raise ValueError(f"{name}: this LoRA is not attached")
            if len(chain) == 1:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            else:
                del chain[index]
        return model
