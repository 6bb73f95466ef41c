"""Teacher, student and fake score over ONE set of base weights.

The base network is frozen; two peft LoRA adapters, "student" and "fake", are injected into it
with peft's functional API (PixArt's transformer has no ``add_adapter``, so every backbone goes
the same way); the teacher is the base with adapters disabled. The official demo holds three
full copies instead.

The trap this module exists for: peft's ``set_adapter`` freezes every adapter but the active one,
and gradient checkpointing recomputes the forward with whatever adapter is active at backward
time. A role switch between the student's forward and its ``backward()`` therefore gives None or
silently wrong student gradients. :meth:`AdapterRoles.use` restores the previous role on exit,
so a training step written as

    with roles.use("student"):
        loss = objective.generator_loss(student, teacher, fake, ...)  # teacher/fake calls nest
        loss.backward()

backpropagates with the student active, whatever ran in between.

A switch walks no modules: the tuner layers and each adapter's parameters are found once, and a
switch sets what peft's ``set_adapter`` / ``enable_adapters`` would set (each layer's active
adapter and ``disable_adapters`` flag, the requires_grad of the LoRA parameters) directly.
:func:`activate_with_peft` is the same switch through peft's own calls (the reference of the
tests and of ``benchmarks/role_switch.py``).

The adapters' initial weights come from peft's initialisers, which draw from torch's global RNG;
``seed`` makes them a function of the seed alone (the global RNG is left as it was).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
from torch import nn

ROLES = ("teacher", "student", "fake")
ADAPTERS = ("student", "fake")


def activate_with_peft(model: nn.Module, role: str) -> None:
    """Switch ``model``'s adapters to ``role`` with peft's own calls, walking every module: what
    :meth:`AdapterRoles.activate` did before it cached the layers. Kept as the reference."""
    from peft.functional import set_adapter
    from peft.tuners.tuners_utils import BaseTunerLayer

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "teacher":
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(False)
    else:
        set_adapter(model, role)
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and layer.disable_adapters:
                layer.enable_adapters(True)


@contextlib.contextmanager
def seeded(seed: int | None, devices: Sequence[int] = ()):
    """Run a block on torch's global RNG seeded with ``seed`` (CPU and every CUDA device in
    ``devices``), then put the global RNG back as it was. ``seed=None``: the global RNG as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=list(devices)):
        torch.manual_seed(seed)
        yield


def lora_config(rank: int, alpha: float, target_modules: Sequence[str], init_lora_weights=True):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                      init_lora_weights=init_lora_weights)


class RoleSwitch:
    """Which of the three roles the next forward runs as. Subclasses implement :meth:`activate`;
    :meth:`use` is the one safe way to switch for a block (see the module docstring)."""

    _role: str | None = None

    @property
    def role(self) -> str | None:
        return self._role

    def activate(self, role: str) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def use(self, role: str):
        """Run a block as ``role`` and restore the previous role afterwards (also on an exception)."""
        previous = self._role
        self.activate(role)
        try:
            yield self
        finally:
            self.activate(previous)


class AdapterRoles(RoleSwitch):
    """The three roles of TDM on one base module (frozen), with LoRA adapters "student" and "fake"."""

    def __init__(self, model: nn.Module, student_config, fake_config=None, seed: int | None = None):
        """``seed``: the adapters' initialisation draws from a global RNG seeded with it (then
        restored), so the same seed gives the same initial LoRA weights in every process and run;
        None draws from the global RNG as it stands."""
        from peft import inject_adapter_in_model

        model.requires_grad_(False)
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with seeded(seed, cuda):
            inject_adapter_in_model(student_config, model, adapter_name="student")
            with warnings.catch_warnings():  # a second adapter on one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(fake_config or student_config, model, adapter_name="fake")
        self.model = model
        self.configs = {"student": student_config, "fake": fake_config or student_config}
        self._role = None
        self._index()
        self.activate("student")

    # -------------------------------------------------------------- switching
    def _index(self) -> None:
        """Find the tuner layers and the parameters each switch sets, once (a switch then walks no
        modules). Mirrors peft: ``set_adapter(name)`` makes trainable exactly the parameters under
        ``layer.<adapter_layer_name>[name]`` (minus those the layer declares frozen) and freezes
        every other adapter parameter; ``enable_adapters(False)`` freezes them all."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._layers: list[nn.Module] = []
        by_key: dict[str, dict[int, nn.Parameter]] = {}
        frozen: dict[int, nn.Parameter] = {}
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                raise ValueError("AdapterRoles switches LoRA layers only; modules_to_save / trainable tokens "
                                 f"({type(module).__name__}) are not supported")
            if not isinstance(module, BaseTunerLayer):
                continue
            if module.merged:
                raise ValueError("AdapterRoles needs unmerged adapters (a merged LoRA cannot be switched off)")
            self._layers.append(module)
            for layer_name in module.adapter_layer_names:
                for key, sub in getattr(module, layer_name).items():
                    params = [sub] if isinstance(sub, torch.Tensor) else list(sub.parameters())
                    by_key.setdefault(key, {}).update((id(p), p) for p in params if p.is_leaf)
            for key, names in (module.frozen_peft_weight_names or {}).items():
                for layer_name in names:
                    group = getattr(module, layer_name) if layer_name in module.adapter_layer_names else {}
                    if key in group:
                        sub = group[key]
                        params = [sub] if isinstance(sub, torch.Tensor) else list(sub.parameters())
                        frozen.update((id(p), p) for p in params)
        everything = {i: p for group in by_key.values() for i, p in group.items()}
        self._all_adapter_params = list(everything.values())
        self._trainable = {}  # adapter -> (parameters it trains, every other adapter parameter)
        for adapter in ADAPTERS:
            mine = {i: p for i, p in by_key.get(adapter, {}).items() if i not in frozen}
            self._trainable[adapter] = (list(mine.values()), [p for i, p in everything.items() if i not in mine])
        # parameters(adapter): LoRA parameters by name, in named_parameters order (optimizer states)
        named = [(name + ".", p) for name, p in self.model.named_parameters() if "lora_" in name]
        self._params = {a: [p for name, p in named if f".{a}." in name] for a in ADAPTERS}

    def activate(self, role: str) -> None:
        """Make ``role`` the one the next forward runs as (its adapter trainable, the other frozen;
        teacher: adapters disabled, all frozen). The same state as :func:`activate_with_peft`."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == self._role:
            return
        # nn.Module keeps plain attributes in __dict__; writing there skips its slow __setattr__
        if role == "teacher":
            for p in self._all_adapter_params:
                p.requires_grad = False
            for layer in self._layers:
                layer.__dict__["_disable_adapters"] = True
        else:
            trainable, others = self._trainable[role]
            for p in others:
                p.requires_grad = False
            for p in trainable:
                p.requires_grad = True
            for layer in self._layers:
                state = layer.__dict__
                state["_active_adapter"] = [role]
                state["_disable_adapters"] = False
        self._role = role

    # -------------------------------------------------------------- parameters
    def parameters(self, adapter: str) -> list[nn.Parameter]:
        """The LoRA parameters of one adapter (whatever role is active)."""
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        return list(self._params[adapter])

    def state_dict(self, adapter: str) -> dict[str, torch.Tensor]:
        """The adapter's weights with peft's adapter-free key names (what set_state_dict takes)."""
        from peft.functional import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in
                get_peft_model_state_dict(self.model, adapter_name=adapter).items()}

    def load_state_dict(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        from peft.functional import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"{len(unexpected)} unexpected keys for adapter {adapter!r}: {unexpected[:8]}")
        role = self._role  # set_peft_model_state_dict can change requires_grad flags: re-apply the role
        self._role = None
        self._index()  # and could replace parameter objects: find them again
        self.activate(role)

    def cast_adapters(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep LoRA parameters in float32 when the base runs in fp16/bf16."""
        for adapter in ADAPTERS:
            for p in self.parameters(adapter):
                p.data = p.data.to(dtype)
