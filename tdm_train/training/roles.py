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
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

ROLES = ("teacher", "student", "fake")
ADAPTERS = ("student", "fake")


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

    def __init__(self, model: nn.Module, student_config, fake_config=None):
        from peft import inject_adapter_in_model

        model.requires_grad_(False)
        inject_adapter_in_model(student_config, model, adapter_name="student")
        with warnings.catch_warnings():  # a second adapter on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(fake_config or student_config, model, adapter_name="fake")
        self.model = model
        self.configs = {"student": student_config, "fake": fake_config or student_config}
        self._role = None
        self.activate("student")

    # -------------------------------------------------------------- switching
    def _tuner_layers(self) -> Iterator[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return (m for m in self.model.modules() if isinstance(m, BaseTunerLayer))

    def activate(self, role: str) -> None:
        """Make ``role`` the one the next forward runs as (its adapter trainable, the other frozen)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == self._role:
            return
        from peft.functional import set_adapter

        if role == "teacher":
            for layer in self._tuner_layers():
                layer.enable_adapters(False)
        else:
            set_adapter(self.model, role)
            for layer in self._tuner_layers():
                if layer.disable_adapters:
                    layer.enable_adapters(True)
        self._role = role

    # -------------------------------------------------------------- parameters
    def parameters(self, adapter: str) -> list[nn.Parameter]:
        """The LoRA parameters of one adapter (whatever role is active)."""
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        marker = f".{adapter}."
        return [p for name, p in self.model.named_parameters() if "lora_" in name and marker in name + "."]

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
        self.activate(role)

    def cast_adapters(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep LoRA parameters in float32 when the base runs in fp16/bf16."""
        for adapter in ADAPTERS:
            for p in self.parameters(adapter):
                p.data = p.data.to(dtype)
