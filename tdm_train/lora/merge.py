"""Fuse a LoRA file into a diffusers model's weights: W += strength * (alpha / rank) * up @ down.

Reads the formats a TDM student comes in — our ``pytorch_lora_weights.safetensors`` (peft keys
under ``unet.`` / ``transformer.`` with diffusers' ``lora_adapter_metadata`` giving alpha and
rank), the kohya file (``lora_unet_<path>.lora_down/lora_up/alpha``), and peft keys with ``.alpha``
tensors (our PixArt ComfyUI file, the official CogVideoX LoRA) — and refuses, listing them, keys
that match no module of the model (a LoRA for another architecture) instead of silently skipping.

Fusing is what an export needs (the engine has plain weights); the trainer and ComfyUI keep
LoRAs separate. Safetensors only: pickle files are never loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import IncompatibleFile, NonFinite, unsafe_pickle
from .metadata import describe_unmatched, recommend
from .step_embedding import KEY_PREFIX as STEP_CONDITION_PREFIX

COMPONENT_PREFIXES = ("unet.", "transformer.", "base_model.model.", "diffusion_model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_")
_DOWN = re.compile(r"\.(lora_A|lora_down|lora\.down)(\.[^.]+)?\.weight$")
_UP = re.compile(r"\.(lora_B|lora_up|lora\.up)(\.[^.]+)?\.weight$")


@dataclass
class LoraLayer:
    down: torch.Tensor  # [rank, in] (or conv [rank, in, kh, kw])
    up: torch.Tensor  # [out, rank] (or conv [out, rank, 1, 1])
    alpha: float | None = None


@dataclass
class FusedLora:
    path: str
    strength: float
    strength_source: str
    modules: int
    metadata: dict = field(default_factory=dict)


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA state dict saved with torch.save, read by torch's weights-only unpickler: tensors and
    plain containers only. A pickle asking for anything else is refused and never executed."""
    import pickle

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_pickle(path, error) from None
    except Exception as error:  # noqa: BLE001 - not a torch file, a damaged archive
        raise IncompatibleFile(f"{path} is not a readable torch file ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise IncompatibleFile(f"{path} is not a state dict of named tensors")
    return data


def read_lora(path: str | Path) -> tuple[dict[str, LoraLayer], dict[str, str]]:
    """Layers keyed by the module name as written in the file (prefix kept), and the file metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if path.suffix.lower() in PICKLE_SUFFIXES:  # e.g. the official tdm_dreamshaper.pt
        tensors, metadata = read_pickled_state_dict(path), {}
    elif path.suffix != ".safetensors":
        raise IncompatibleFile(f"{path}: a LoRA is a .safetensors file (or a weights-only {'/'.join(PICKLE_SUFFIXES)} "
                               "state dict)")
    else:
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as error:
            raise IncompatibleFile(f"{path} is not a readable safetensors file ({error})") from None
    poisoned = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if poisoned:  # a diverged training run: fusing it would make every export of it NaN
        shown = ", ".join(poisoned[:6]) + (f" and {len(poisoned) - 6} more" if len(poisoned) > 6 else "")
        raise NonFinite(f"{path} holds NaN or inf in {len(poisoned)} of {len(tensors)} tensors ({shown}): it is "
                        "refused; use an earlier checkpoint of the run (a TDM training run never saves such a LoRA)")
    peft_config = _adapter_config(metadata)
    layers: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith(STEP_CONDITION_PREFIX):
            continue  # a TDM-unify student's K condition: step_embedding.StepConditions reads it
        if match := _DOWN.search(key):
            layers.setdefault(key[: match.start()], {})["down"] = value
        elif match := _UP.search(key):
            layers.setdefault(key[: match.start()], {})["up"] = value
        elif key.endswith(".alpha"):
            layers.setdefault(key[: -len(".alpha")], {})["alpha"] = float(value)
        else:
            raise IncompatibleFile(f"{path}: key {key!r} is not a LoRA weight (expected lora_A/lora_B, lora_down/lora_up "
                             "or .alpha keys); is this a full checkpoint rather than a LoRA?")
    result = {}
    for name, parts in layers.items():
        if "down" not in parts or "up" not in parts:
            raise IncompatibleFile(f"{path}: module {name} has {sorted(parts)} but needs both down and up weights")
        alpha = parts.get("alpha")
        if alpha is None and peft_config:
            alpha = _peft_alpha(peft_config, _strip(name), parts["down"].shape[0])
        result[name] = LoraLayer(parts["down"], parts["up"], alpha)
    if not result:
        raise IncompatibleFile(f"{path} holds no LoRA weights")
    return result, metadata


def _adapter_config(metadata: dict) -> dict:
    """The peft LoraConfig fields in diffusers' ``lora_adapter_metadata`` (one adapter per file),
    component prefix dropped; empty when the file has none or it gives no lora_alpha."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = {key.rsplit(".", 1)[-1]: value for key, value in json.loads(raw).items()}
    return config if config.get("lora_alpha") is not None else {}


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    """The alpha that gives peft's scale for ``module``: peft scales every module by its alpha
    (``lora_alpha``, or its ``alpha_pattern`` entry) over the module's OWN rank (``rank_pattern``
    modules included), or over sqrt(rank) with ``use_rslora``."""
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _module_index(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear / Conv module by its dotted path and by kohya's underscored form."""
    index = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d)):
            index[name] = module
            index[name.replace(".", "_")] = module
    return index


def _strip(name: str) -> str:
    for prefix in KOHYA_PREFIXES + COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


@dataclass
class LoraMatch:
    """The modules of a model that a LoRA file's layers land on, and the layers that land nowhere."""

    path: str
    modules: dict[str, tuple[torch.nn.Module, LoraLayer]]  # file's module name -> (module, layer)
    unmatched: list[str]
    metadata: dict

    def delta(self, name: str, strength: float) -> torch.Tensor:
        """strength * alpha / rank * up @ down, shaped like the module's weight (float32)."""
        module, layer = self.modules[name]
        rank = layer.down.shape[0]
        scale = strength * ((layer.alpha / rank) if layer.alpha is not None else 1.0)
        return ((layer.up.float().flatten(1) @ layer.down.float().flatten(1)) * scale).reshape(module.weight.shape)


def match_lora(model: torch.nn.Module, path: str | Path) -> LoraMatch:
    """Reads ``path`` and finds each layer's module in ``model``; a layer whose shapes do not fit
    its module is an error (a LoRA for another model size), one with no module is listed."""
    layers, metadata = read_lora(path)
    index = _module_index(model)
    matched, unmatched = {}, []
    for name, layer in layers.items():
        module = index.get(_strip(name))
        if module is None:
            unmatched.append(name)
            continue
        weight = module.weight
        down, up = layer.down.flatten(1), layer.up.flatten(1)
        # up [out, rank] @ down [rank, in * kernel] must give exactly [out, in * kernel] of the weight
        # (a numel check alone would fuse a transposed LoRA, [in, out], into garbage)
        if up.shape[1] != down.shape[0] or up.shape[0] != weight.shape[0] or down.shape[1] != weight[0].numel():
            raise IncompatibleFile(f"{path}: {name} has up {tuple(layer.up.shape)} and down {tuple(layer.down.shape)}, "
                             f"which do not fit {_strip(name)}'s weight {tuple(weight.shape)}: a LoRA for another "
                             "model size, or a broken file")
        matched[name] = (module, layer)
    return LoraMatch(str(path), matched, unmatched, metadata)


def resolve_strength(metadata: dict, path: str | Path, strength: float | None) -> tuple[float, str]:
    """``strength`` if given, else the file's recorded one (tdm.lora_strength, a known release), else 1."""
    if strength is not None:
        return float(strength), "given"
    recommendation = recommend(metadata, str(path))
    if recommendation:
        return recommendation.strength, recommendation.source
    return 1.0, "default 1.0 (the file records no strength)"


@torch.no_grad()
def fuse_lora(model: torch.nn.Module, path: str | Path, strength: float | None = None) -> FusedLora:
    """Adds the LoRA at ``path`` into ``model``'s weights. ``strength`` None takes the file's own
    recommendation (our ``tdm.lora_strength`` metadata, or a known release), else 1.0.
    Nothing is changed unless every key of the file matches a module."""
    match = match_lora(model, path)
    strength, source = resolve_strength(match.metadata, path, strength)
    if match.unmatched:
        raise IncompatibleFile(f"{path} does not fit this {type(model).__name__}: "
                         + describe_unmatched(match.unmatched, len(match.unmatched) + len(match.modules)))
    updates = [(module.weight, match.delta(name, strength)) for name, (module, _) in match.modules.items()]
    for weight, delta in updates:  # only now, after every layer was checked
        weight.add_(delta.to(weight.device, weight.dtype))
    return FusedLora(str(path), float(strength), source, len(match.modules), match.metadata)
