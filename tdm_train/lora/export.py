"""The student LoRA as files that load everywhere, with their true alpha.

- ``pytorch_lora_weights.safetensors`` (the name diffusers looks for): raw peft keys under the
  pipeline's component prefix (``unet.`` / ``transformer.``) plus diffusers' ``lora_adapter_metadata``
  header, so ``load_lora_weights`` loads every module at the trained scale. (Converting the keys
  with ``convert_state_dict_to_diffusers`` drops SDXL's attention modules on load; a file without
  the metadata loads at scale 1 instead of alpha / rank.)
- ``tdm_lora_comfyui.safetensors``: for SDXL, kohya names (``lora_unet_<module_path>``,
  ``lora_down`` / ``lora_up``) with a ``.alpha`` tensor holding the TRUE alpha (diffusers'
  ``convert_state_dict_to_kohya`` writes alpha = rank); for PixArt, ``transformer.`` peft keys
  with ``.alpha`` tensors; CogVideoX (not in ComfyUI core) the diffusers format.

Both carry kohya ``ss_*`` / ``modelspec.*`` fields and our ``tdm.*`` fields (timesteps, K,
recommended CFG 1 and strength, the teacher CFG it was trained with), and a model card next to
them gives the inference settings. A TDM-unify student's K condition (lora/step_embedding.py: one
vector c_K per trained K and the ``tdm.step_embedding`` metadata) goes into both files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import atomic
from ..recipes import describe_guidance
from .metadata import EMA_DECAY_KEY, SETTINGS_KEY, STRENGTH_KEY, TRAINING_CFG_KEY

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "tdm_lora_comfyui.safetensors"

# per backend: the diffusers pipeline component, the SAI model-spec architecture, kohya's base model id
ARCHITECTURES = {
    "sdxl": ("unet", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"),
    "pixart": ("transformer", "pixart-alpha/lora", "pixart_alpha"),
    "cogvideox": ("transformer", "cogvideox-2b/lora", "cogvideox_2b"),
    "sd3": ("transformer", "stable-diffusion-v3-medium/lora", "sd3"),
    "sd3.5": ("transformer", "stable-diffusion-v3.5-medium/lora", "sd3.5"),
    "digits": ("unet", "tdm-digits-unet/lora", "tdm_digits"),
    "sd15": ("unet", "stable-diffusion-v1/lora", "sd_v1"),
}


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` grouped by module."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                modules.setdefault(key[: -len(marker)], {})[part] = value
                break
        else:
            raise ValueError(f"unexpected key in a LoRA state dict: {key}")
    incomplete = [m for m, parts in modules.items() if set(parts) != {"lora_A", "lora_B"}]
    if incomplete:
        raise ValueError(f"LoRA modules missing lora_A or lora_B: {incomplete[:5]}")
    return modules


def diffusers_state_dict(state: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    return {f"{component}.{key}": value for key, value in state.items()}


def kohya_state_dict(state: Mapping[str, torch.Tensor], alpha: float, prefix: str = "lora_unet") -> dict:
    """kohya / ComfyUI names with the true alpha per module."""
    out = {}
    for module, parts in _modules(state).items():
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = parts["lora_A"]
        out[f"{name}.lora_up.weight"] = parts["lora_B"]
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def transformer_alpha_state_dict(state: Mapping[str, torch.Tensor], alpha: float, component: str) -> dict:
    """``transformer.<module>.lora_A/B.weight`` plus ``<module>.alpha`` (ComfyUI's PixArt key map)."""
    out = {}
    for module, parts in _modules(state).items():
        out[f"{component}.{module}.lora_A.weight"] = parts["lora_A"]
        out[f"{component}.{module}.lora_B.weight"] = parts["lora_B"]
        out[f"{component}.{module}.alpha"] = torch.tensor(float(alpha))
    return out


def lora_metadata(backend_name: str, rank: int, alpha: float, target_modules, timesteps: list[int],
                  steps_trained: int, extra_sampling: dict | None = None, title: str = "TDM student",
                  training_cfg: float | None = None) -> dict[str, str]:
    """kohya / model-spec / ``tdm.*`` fields. ``training_cfg`` is the teacher guidance the student
    was distilled from (``tdm.training_cfg``; sampling stays at ``tdm.recommended_cfg`` 1)."""
    component, architecture, base_version = ARCHITECTURES[backend_name]
    sampling = {"timesteps": list(timesteps), "num_steps": len(timesteps), "cfg": 1.0, **(extra_sampling or {})}
    training = {} if training_cfg is None else {TRAINING_CFG_KEY: f"{float(training_cfg):g}"}
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": base_version,
        "ss_max_train_steps": str(steps_trained),
        "ss_training_comment": "TDM (Trajectory Distribution Matching) few-step student, data-free",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "tdm.timesteps": json.dumps(list(timesteps)),
        "tdm.num_steps": str(len(timesteps)),
        "tdm.recommended_cfg": "1.0",
        STRENGTH_KEY: "1.0",
        SETTINGS_KEY: json.dumps(sampling),
        "tdm.target_modules": json.dumps(sorted(target_modules)),
        **training,
    }


def save_student_lora(output_dir: str | Path, backend_name: str, state: Mapping[str, torch.Tensor], rank: int,
                      alpha: float, target_modules, timesteps: list[int], steps_trained: int,
                      extra_sampling: dict | None = None, training_cfg: float | None = None,
                      step_conditions=None, family: str | None = None,
                      ema_decay: float | None = None) -> tuple[Path, Path]:
    """Writes both files and the model card; returns (diffusers file, ComfyUI file).
    ``training_cfg``: the teacher guidance it was trained with, recorded in both.
    ``step_conditions``: a TDM-unify student's :class:`~tdm_train.lora.step_embedding.StepConditions`
    (its c_K tensors and metadata go into both files), None for a fixed-K student. ``family``: the
    recipe family the model card names the guidance's source by (default the backend's name).
    ``ema_decay``: the weights are the EMA of the student's with that decay (``tdm.ema_decay``)."""
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save a LoRA with non-finite weights: {bad[:4]}")
    component = ARCHITECTURES[backend_name][0]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    condition_tensors: dict[str, torch.Tensor] = {}
    if step_conditions is not None:
        extra_sampling = {**(extra_sampling or {}), "unify_steps": step_conditions.steps}
    meta = lora_metadata(family if family in ARCHITECTURES else backend_name, rank, alpha, target_modules,
                         timesteps, steps_trained, extra_sampling, training_cfg=training_cfg)
    if ema_decay is not None:
        meta[EMA_DECAY_KEY] = f"{float(ema_decay):g}"
    if step_conditions is not None:
        meta.update(step_conditions.metadata())
        condition_tensors = step_conditions.tensors()

    peft_config = {"r": rank, "lora_alpha": float(alpha), "target_modules": sorted(target_modules),
                   "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False}
    diffusers_meta = {**meta, "lora_adapter_metadata": json.dumps(
        {f"{component}.{k}": v for k, v in peft_config.items()}, indent=2, sort_keys=True)}
    diffusers_path = output_dir / DIFFUSERS_FILE
    atomic.save_safetensors({**diffusers_state_dict(state, component), **condition_tensors}, diffusers_path,
                            diffusers_meta)

    comfy_path = output_dir / COMFYUI_FILE
    comfy_meta = meta
    if backend_name == "sdxl":
        comfy = kohya_state_dict(state, alpha)
    elif backend_name in ("pixart", "sd3"):  # ComfyUI's PixArt and SD3 key maps take transformer.<module> names
        comfy = transformer_alpha_state_dict(state, alpha, component)
    else:  # no ComfyUI core model: the diffusers file again, its adapter metadata (alpha, rank) included
        comfy, comfy_meta = diffusers_state_dict(state, component), diffusers_meta
    atomic.save_safetensors({**comfy, **condition_tensors}, comfy_path, comfy_meta)
    _write_model_card(output_dir, backend_name, rank, alpha, timesteps, steps_trained, training_cfg, step_conditions,
                      family or backend_name, ema_decay)
    return diffusers_path, comfy_path


def _write_model_card(output_dir: Path, backend_name: str, rank: int, alpha: float, timesteps: list[int],
                      steps_trained: int, training_cfg: float | None = None, step_conditions=None,
                      family: str | None = None, ema_decay: float | None = None) -> None:
    grid = ", ".join(str(t) for t in timesteps)
    ema = ("" if ema_decay is None else f"Its weights are the EMA of the student's (decay {float(ema_decay):g}, "
           "through diffusers EMAModel's ramp (1 + n) / (10 + n)).\n")
    guidance = ("" if training_cfg is None else "Teacher guidance (CFG) distilled into it: "
                f"{describe_guidance(float(training_cfg), family or backend_name)}.\n")
    unify = _unify_card(step_conditions, timesteps[0] + 1) if step_conditions is not None else ""
    card = f"""# TDM student LoRA ({backend_name})

Distilled with TDM (Trajectory Distribution Matching, Luo et al., ICCV 2025) by ComfyUI-TDM:
{steps_trained} training steps, LoRA rank {rank}, alpha {alpha:g} (scale {alpha / rank:g}).
{guidance}{ema}
## Inference settings (the ones it was trained for)
- {len(timesteps)} steps at exactly these timesteps: **{grid}**, starting from pure N(0, I) noise
  at {timesteps[0]}, deterministic DDIM steps (eta 0), guidance scale **1** (no CFG), LoRA strength 1.
- ComfyUI: `{COMFYUI_FILE}` in `models/loras`, TDM LoRA Loader (strength "recorded") and
  TDM KSampler with preset `custom` and timesteps `{grid}` (or `tdm_uniform` when they are the
  uniform grid), cfg 1.
- diffusers: `pipe.load_lora_weights("{output_dir.name}")` loads `{DIFFUSERS_FILE}` at its trained
  scale; sample with `tdm_train.tdm_sample(...)` on the grid above (stock schedulers space their
  timesteps differently, e.g. 999/749/499/249).
""" + unify
    atomic.write_text(output_dir / "README.md", card)


def _unify_card(conditions, total_steps: int) -> str:
    from ..timesteps import tdm_timesteps

    steps = conditions.steps
    grids = "; ".join(f"K={k}: {', '.join(str(t) for t in tdm_timesteps(k, total_steps))}" for k in steps)
    return f"""
## Sampling-steps-aware (TDM-unify): sample with K in {{{', '.join(str(k) for k in steps)}}}
This student was trained for {', '.join(str(k) for k in steps)} steps and is told K: beside the LoRA
weights both files hold one vector per trained K (`tdm_step_embedding.k<K>`, width {conditions.dim}) and the
metadata `tdm.step_embedding` names the layer it is added to (`{conditions.target}`, the last Linear of
the timestep embedding). Sample with one of these K, on that K's uniform grid ({grids}; the grid above is
the one of K={steps[-1]}), with c_K added to that layer's output
(`tdm_train.lora.step_embedding.applied(model, StepConditions.read(path), K)`) or folded into its bias
(`fold_into_bias`). Stock loaders (diffusers' `load_lora_weights`, ComfyUI's LoraLoader) ignore these
tensors: the student then runs without its K condition, which is not what it was trained for.
"""
