"""The fake score's step-count condition for sampling-steps-aware training (TDM-unify).

One fake score shared by several step counts K learns the mixture of their distributions and
biases each K's gradient; telling it K removes the bias. The paper does not publish how K is
embedded; here K gets sinusoidal features and a linear layer whose output is added to the
network's timestep embedding, ZERO-initialised so training starts exactly from the teacher. It
is active only while the fake role runs; the student stays a plain LoRA and the module is never
exported (it exists for training only)."""

from __future__ import annotations

import math

import torch
from torch import nn

# where each backbone computes its timestep embedding (output [B, D])
TIME_EMBEDDING_MODULES = {
    "sdxl": "time_embedding",
    "digits": "time_embedding",
    "cogvideox": "time_embedding",
    "pixart": "adaln_single.emb.timestep_embedder",
}


class StepCountEmbedding(nn.Module):
    def __init__(self, dim: int, max_steps: int = 8, features: int = 32):
        super().__init__()
        self.max_steps, self.features = max_steps, features
        self.proj = nn.Linear(features, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.num_steps: torch.Tensor | None = None  # set per batch by the trainer, None = off

    def forward(self, num_steps: torch.Tensor) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=num_steps.device) / half)
        angles = (num_steps.float() * (1000.0 / self.max_steps))[:, None] * freqs[None]
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=1).to(self.proj.weight.dtype))


def attach(model: nn.Module, backend_name: str, roles, max_steps: int) -> StepCountEmbedding:
    """Add a StepCountEmbedding to ``model``'s timestep embedding, active in the fake role only.
    ``backend_name`` is a key of TIME_EMBEDDING_MODULES, or the module's path itself."""
    name = TIME_EMBEDDING_MODULES.get(backend_name, backend_name)
    target = model.get_submodule(name)
    dim = [m for m in target.modules() if isinstance(m, nn.Linear)][-1].out_features
    embedding = StepCountEmbedding(dim, max_steps).to(next(model.parameters()).device)

    def add_step_embedding(module, inputs, output):
        if embedding.num_steps is None or roles.role != "fake":
            return output
        if embedding.num_steps.shape[0] != output.shape[0]:
            raise RuntimeError(f"step condition for {embedding.num_steps.shape[0]} samples, batch of {output.shape[0]}")
        return output + embedding(embedding.num_steps.to(output.device)).to(output.dtype)

    target.register_forward_hook(add_step_embedding)
    return embedding
