"""The step-count condition of sampling-steps-aware training (TDM-unify), for the student and
the fake score.

TDM_SPEC: K is fed as a condition to the student and the fake score. One fake score shared by
several step counts K learns the mixture of their distributions and biases each K's gradient;
telling it K removes the bias. The student told K can be a different network for each K (a
1-step student must jump much further than a 4-step one). The paper does not publish how K is
embedded; here K gets sinusoidal features and a linear layer whose output is added to the
output of the last Linear of the network's timestep embedding, ZERO-initialised so training
starts exactly from the plain LoRA student (and fake score). Each role has its own embedding,
active only while that role runs (the teacher has none). The fake's exists for training only;
the student's is exported as one vector c_K = embedding(K) per trained K (lora/step_embedding.py),
which is exactly what it adds for that K."""

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


    def vectors(self, steps) -> dict[int, torch.Tensor]:
        """c_K = embedding(K) for every K in ``steps`` (what the files store)."""
        with torch.no_grad():
            out = self(torch.tensor(sorted(int(k) for k in steps), device=self.proj.weight.device))
        return {int(k): v.detach().float().cpu() for k, v in zip(sorted(steps), out)}


def time_embedding_path(backend_name: str) -> str:
    """The module path of a backbone's timestep embedding (or ``backend_name`` itself when it is one)."""
    return TIME_EMBEDDING_MODULES.get(backend_name, backend_name)


def attach(model: nn.Module, backend_name: str, roles, max_steps: int, role: str = "fake") -> StepCountEmbedding:
    """Add a StepCountEmbedding to the output of the last Linear of ``model``'s timestep embedding,
    active in ``role`` only ("fake" or "student"). ``backend_name`` is a key of
    TIME_EMBEDDING_MODULES, or the module's path itself. Returns the embedding; its
    ``.target`` is the Linear's path (where the exported c_K go)."""
    from .lora.step_embedding import output_linear

    name = output_linear(model, time_embedding_path(backend_name))
    target = model.get_submodule(name)
    embedding = StepCountEmbedding(target.out_features, max_steps).to(next(model.parameters()).device)
    embedding.target = name

    def add_step_embedding(module, inputs, output):
        if embedding.num_steps is None or roles.role != role:
            return output
        if embedding.num_steps.shape[0] != output.shape[0]:
            raise RuntimeError(f"step condition for {embedding.num_steps.shape[0]} samples, batch of {output.shape[0]}")
        return output + embedding(embedding.num_steps.to(output.device)).to(output.dtype)

    target.register_forward_hook(add_step_embedding)
    return embedding
