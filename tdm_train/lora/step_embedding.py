"""A TDM-unify student's step-count condition, as it travels with its LoRA.

A sampling-steps-aware student is told how many steps K it is sampled with: a vector c_K is
added to the output of the last Linear of the network's timestep embedding (the trainer learns
it with a zero-initialised :class:`~tdm_train.step_condition.StepCountEmbedding`, so a fresh
student is the teacher). Only the trained K have a vector, and for one K the condition is a
constant: the files store c_K itself, one tensor per K, so every consumer applies it the same way:

- the diffusers file and the ComfyUI file hold ``tdm_step_embedding.k<K>`` ([D], float32) beside
  the LoRA weights, and the metadata key ``tdm.step_embedding`` says where it goes (JSON:
  ``{"target": <diffusers module path>, "comfy_target": <ComfyUI diffusion_model path>,
  "steps": [...], "dim": D}``);
- sampling adds c_K to that Linear's output (:func:`applied`, a forward hook, removed afterwards);
- an export for one K folds it into the Linear's bias (:func:`fold_into_bias`): output + c_K is
  exactly ``W x + (b + c_K)``.

A loader that does not know these keys (ComfyUI's stock LoraLoader, diffusers' load_lora_weights)
reports them as not loaded: the student then runs without its K condition.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

KEY_PREFIX = "tdm_step_embedding."
METADATA_KEY = "tdm.step_embedding"

# the Linear whose output the condition is added to, per family: (diffusers path, ComfyUI path).
# Both are the last layer of the timestep MLP, before the text-time / class / size embeddings
# are added (diffusers' TimestepEmbedding.linear_2 with no post-activation; ComfyUI's
# ``time_embed`` Sequential(Linear, SiLU, Linear) in UNets, ``t_embedder.mlp`` in PixArt).
TARGETS = {
    "sdxl": ("time_embedding.linear_2", "time_embed.2"),
    "sd15": ("time_embedding.linear_2", "time_embed.2"),
    "digits": ("time_embedding.linear_2", None),
    "cogvideox": ("time_embedding.linear_2", None),  # ComfyUI runs the diffusers model (nodes/cogvideox.py)
    "pixart": ("adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
}


def key(num_steps: int) -> str:
    return f"{KEY_PREFIX}k{int(num_steps)}"


def output_linear(model: nn.Module, time_embedding_path: str) -> str:
    """The path of the Linear that produces the output of the module at ``time_embedding_path``
    (the module itself when it is a Linear). Refuses a module whose last Linear is followed by
    an activation (diffusers' ``post_act``), where adding after the Linear would differ."""
    module = model.get_submodule(time_embedding_path)
    if isinstance(module, nn.Linear):
        return time_embedding_path
    if getattr(module, "post_act", None) is not None:
        raise ValueError(f"{time_embedding_path} applies an activation after its last Linear; "
                         "a step condition there is not a bias")
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{time_embedding_path} has no Linear layer")
    return f"{time_embedding_path}.{linears[-1]}"


@dataclass
class StepConditions:
    """The c_K of every trained K, and the Linear (diffusers path) they are added to."""

    target: str
    vectors: dict[int, torch.Tensor]
    comfy_target: str | None = None

    def __post_init__(self):
        if not self.vectors:
            raise ValueError("a step condition needs at least one trained step count")
        dims = {tuple(v.shape) for v in self.vectors.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"step-condition vectors must all be [D], got shapes {sorted(dims)}")
        bad = [k for k, v in self.vectors.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"step-condition vectors for K={bad} are not finite")
        self.vectors = {int(k): v.detach().float().cpu() for k, v in sorted(self.vectors.items())}

    @property
    def steps(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def dim(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def vector(self, num_steps: int) -> torch.Tensor:
        """c_K; a K the student was not trained for is refused (its condition is undefined)."""
        if int(num_steps) not in self.vectors:
            raise ValueError(f"this TDM-unify student was trained for {self.steps} steps, not {num_steps}: "
                             f"sample it with one of {self.steps}")
        return self.vectors[int(num_steps)]

    # ---------------------------------------------------------------- files
    def tensors(self) -> dict[str, torch.Tensor]:
        return {key(k): v.contiguous() for k, v in self.vectors.items()}

    def metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps({"target": self.target, "comfy_target": self.comfy_target,
                                          "steps": self.steps, "dim": self.dim})}

    @classmethod
    def for_family(cls, family: str, vectors: Mapping[int, torch.Tensor], target: str | None = None) -> StepConditions:
        diffusers_target, comfy_target = TARGETS.get(family, (None, None))
        return cls(target or diffusers_target, dict(vectors), comfy_target)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                   source: str = "LoRA") -> StepConditions | None:
        """The step condition in a LoRA's tensors and metadata; None for a plain (fixed-K) LoRA.
        Tensors without the metadata (or the reverse) are a broken file and refused."""
        keys = [k for k in state if k.startswith(KEY_PREFIX)]
        raw = (metadata or {}).get(METADATA_KEY)
        if not keys and not raw:
            return None
        if not keys or not raw:
            raise ValueError(f"{source}: {'metadata ' + METADATA_KEY if raw else 'tensors ' + ', '.join(keys)} "
                             "without the other half of the TDM-unify step condition")
        try:
            info = json.loads(raw)
            target = info["target"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{source}: metadata {METADATA_KEY} is not the expected JSON {{target, steps, ...}}") from None
        vectors = {}
        for name in keys:
            suffix = name[len(KEY_PREFIX):]
            if not (suffix.startswith("k") and suffix[1:].isdigit()):
                raise ValueError(f"{source}: unexpected step-condition key {name!r} (expected {KEY_PREFIX}k<K>)")
            vectors[int(suffix[1:])] = state[name]
        if sorted(vectors) != sorted(info.get("steps", vectors)):
            raise ValueError(f"{source}: step-condition tensors for K={sorted(vectors)} but metadata lists {info['steps']}")
        return cls(target, vectors, info.get("comfy_target"))

    @classmethod
    def read(cls, path) -> StepConditions | None:
        """From a safetensors LoRA file (the other tensors are not loaded)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(KEY_PREFIX)}
        return cls.from_state(state, metadata, str(path))


def without_step_condition(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA state dict without the step-condition tensors (for loaders of plain LoRA weights)."""
    return {k: v for k, v in state.items() if not k.startswith(KEY_PREFIX)}


def condition_target(model: nn.Module, path: str) -> nn.Linear:
    """The Linear a step condition is added to (named errors for a missing or non-Linear layer)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the student's step condition goes to {path!r}, which this model does not have "
                         "(a LoRA for another architecture?)") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the step condition's target {path!r} is a {type(module).__name__}, not a Linear")
    return module


@contextlib.contextmanager
def applied(model: nn.Module, conditions: StepConditions | None, num_steps: int, path: str | None = None) -> Iterator[None]:
    """Sample ``model`` as the K-step student: c_K added to the target Linear's output for the
    duration of the block (nothing happens for ``conditions`` None). ``path`` overrides the
    target's path (e.g. ComfyUI's name of the same layer)."""
    if conditions is None:
        yield
        return
    module = condition_target(model, path or conditions.target)
    vector = conditions.vector(num_steps)
    if vector.shape[0] != module.out_features:
        raise ValueError(f"step condition of width {vector.shape[0]} for {path or conditions.target} "
                         f"of width {module.out_features}")

    def add_condition(_module, _inputs, output):
        return output + vector.to(output.device, output.dtype)

    handle = module.register_forward_hook(add_condition)
    try:
        yield
    finally:
        handle.remove()


def fold_into_bias(model: nn.Module, conditions: StepConditions, num_steps: int, path: str | None = None) -> None:
    """Make ``model`` the K-step student for good (an export for one K): bias += c_K."""
    module = condition_target(model, path or conditions.target)
    vector = conditions.vector(num_steps)
    with torch.no_grad():
        if module.bias is None:
            module.bias = nn.Parameter(vector.to(module.weight.device, module.weight.dtype).clone())
        else:
            module.bias.add_(vector.to(module.bias.device, module.bias.dtype))
