"""What every backend provides, and the role callables the TDM objective calls."""

from __future__ import annotations

from typing import Any

import torch

from ..schedule import NoiseSchedule

Condition = dict[str, torch.Tensor]


class Backend:
    """One backbone behind the x0-predictor protocol. Subclasses set ``schedule`` and implement
    :meth:`x0`, :meth:`latent_shape` and :meth:`unconditional`."""

    name = "base"
    default_lora_targets: tuple[str, ...] = ()
    schedule: NoiseSchedule
    model: torch.nn.Module

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def sampling_metadata(self, timesteps: list[int]) -> dict:
        """Sampling settings recorded in the LoRA's tdm.sampling beyond the grid (none by default)."""
        return {}

    @property
    def family(self) -> str:
        """The model family its recipes are keyed by (tdm_train/recipes.py); the backend's name
        unless one backend serves several families."""
        return self.name

    def unconditional(self, cond: Condition) -> Condition:
        """The teacher's unconditional input for a batch of conditions."""
        raise NotImplementedError

    @staticmethod
    def concat(first: Condition, second: Condition) -> Condition:
        return {key: torch.cat([first[key], second[key]]) for key in first}

    @staticmethod
    def select(bank: Condition, index: torch.Tensor) -> Condition:
        return {key: value[index] for key, value in bank.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class EncodedNegativeBackend(Backend):
    """A backbone whose unconditional input is an encoded empty prompt (T5("") for PixArt and
    CogVideoX, SD3's three encoders for ""), kept once as ``negative`` ([1, ...] per key)."""

    negative: Condition

    def unconditional(self, cond: Condition) -> Condition:
        batch = cond["prompt_embeds"].shape[0]
        return {k: v.expand(batch, *v.shape[1:]).to(cond[k].device) for k, v in self.negative.items()}


class RoleFunction:
    """``f(x_t, t, cond) -> x0`` of one role over the shared base: each call runs as that role and
    restores the previous one (see roles.py), so calls can nest inside another role's step."""

    def __init__(self, backend: Backend, roles, role: str):  # roles: a training.roles.RoleSwitch
        self.backend, self.roles, self.role = backend, roles, role

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        with self.roles.use(self.role):
            return self.backend.x0(x_t, t, cond)

    def set_num_steps(self, num_steps: torch.Tensor | None) -> None:
        """TDM-unify: the step count K of each sample, for a role conditioned on it (the fake score)."""
        if self.step_embedding is not None:
            self.step_embedding.num_steps = num_steps

    step_embedding = None

    def paired(self, x_t, t, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional predictions in one batched forward."""
        with self.roles.use(self.role):
            both = self.backend.x0(torch.cat([x_t, x_t]), torch.cat([t, t]), self.backend.concat(cond, uncond))
        return both.chunk(2)
