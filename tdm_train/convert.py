"""`python -m tdm_train.convert`: official TDM releases stored as a positional parameter list into
normal LoRA files.

The TDM SD3.5-Medium LoRA (``tdm_sd3-5_lora.ckpt``) and the TDM-R1 student hold
``{"decay": ..., "ema_parameters": [tensor, ...]}``: the EMA of the trainable parameters of a peft
LoRA, in the order peft creates them (``model.named_parameters()`` filtered to ``lora_``: per
module, lora_A then lora_B), for a stated LoraConfig on a stated base. TDM-R1's ``load_ema`` copies
the list back into such a model by position. Here the model is rebuilt on the meta device from the
base's ``config.json`` alone (no weights are read), the list is matched to its parameter names by
position, every shape is checked, and the result is written with its true alpha:

  <out>/pytorch_lora_weights.safetensors  diffusers keys (``transformer.<module>.lora_A.weight``)
                                          + ``lora_adapter_metadata`` (r, alpha, targets)
  <out>/tdm_lora_comfyui.safetensors      the same names + ``.alpha`` tensors (ComfyUI's key map)

both with the release's ``tdm.*`` settings (strength, steps, cfg, flow shift). The checkpoint is
read by torch's weights-only unpickler only: a pickle holding anything else is refused unexecuted.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic
from .errors import BadInput, IncompatibleFile, read_json_object, run_cli, unsafe_pickle
from .lora.export import COMFYUI_FILE, DIFFUSERS_FILE, diffusers_state_dict, transformer_alpha_state_dict
from .lora.metadata import SETTINGS_KEY, STRENGTH_KEY

SD3_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class Release:
    """What a release's official loading code states: the peft LoraConfig its list was made for,
    the list's key in the checkpoint, and how to sample it."""

    title: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    list_key: str = "ema_parameters"
    strength: float = 1.0
    sampling: dict | None = None


def _flow_grid(shift: float, steps: int = 4) -> list[int]:
    """The table timesteps of a shifted flow grid, sigma' = shift*s / (1 + (shift - 1)*s) on s = 1, 1 - 1/K, ..."""
    sigmas = [1 - k / steps for k in range(steps)]
    return [round(1000 * shift * s / (1 + (shift - 1) * s)) - 1 for s in sigmas]


RELEASES = {
    # Luo-Yihong/TDM_sd3-5_lora, loaded by TDM-R1's load_ema into LoraConfig(r=32, lora_alpha=64,
    # init_lora_weights="gaussian", target_modules=the 8 attention projections); sampled with the Sana
    # DPM-Solver++ config at flow_shift 3, 4 steps, cfg 1
    "tdm-sd3.5-medium": Release("TDM SD3.5-Medium LoRA", 32, 64.0, SD3_ATTENTION,
                                sampling={"num_steps": 4, "cfg": 1.0, "flow_shift": 3.0,
                                          "scheduler": "dpmsolver++ (Sana 1600M config)",
                                          "timesteps": _flow_grid(3.0)}),
    # Luo-Yihong/TDM-R1 (Z-Image-Turbo student): r 32, alpha 64 on six attention projections; 5 scheduler
    # steps = 4 network calls, cfg 0
    "tdm-r1": Release("TDM-R1 student", 32, 64.0, ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
                      sampling={"num_steps": 4, "cfg": 0.0}),
}


def read_parameter_list(path: Path, key: str) -> list[torch.Tensor]:
    """The positional list of a release checkpoint, through the weights-only unpickler."""
    if not path.is_file():
        raise BadInput(f"{path}: no such checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_pickle(path, error) from None
    except Exception as error:  # noqa: BLE001 - a damaged zip archive, not a torch file
        raise IncompatibleFile(f"{path} is not a readable torch checkpoint ({error})") from None
    if not isinstance(data, dict) or key not in data:
        found = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise IncompatibleFile(f"{path} holds no {key!r} list (found {found})")
    values = parameter_list(data, key)
    if values is None:
        raise IncompatibleFile(f"{path}: {key!r} is not a list of tensors")
    return values


def parameter_list(data, key: str = "ema_parameters") -> list[torch.Tensor] | None:
    """The positional parameter list of an unpickled release checkpoint (``{key: [tensor, ...]}``),
    or None when ``data`` holds none (a normal LoRA state dict)."""
    values = data.get(key) if isinstance(data, dict) else None
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, torch.Tensor) for v in values):
        return list(values)
    return None


def lora_parameter_names(base_config: dict, rank: int, alpha: float, targets) -> list[tuple[str, tuple]]:
    """(name, shape) of every trainable parameter peft creates for this LoraConfig on the base, in
    peft's order; the base is built on the meta device from its config."""
    import diffusers
    from accelerate import init_empty_weights
    from peft import LoraConfig, inject_adapter_in_model

    class_name = base_config.get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise IncompatibleFile(f"the base config names {class_name!r}, not a diffusers model class")
    with init_empty_weights():
        model = cls.from_config(base_config)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model)
    return [(name.replace(".default", ""), tuple(p.shape)) for name, p in model.named_parameters() if "lora_" in name]


def lora_from_list(values: list[torch.Tensor], base_config: dict, release: Release,
                   source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The release's positional list as a named peft LoRA state (``<module>.lora_A.weight``, fp32)
    plus the ``tdm.*`` / kohya metadata of its files. ``base_config`` is the base's diffusers
    config (``_class_name`` included); ``source`` names the list in errors and metadata."""
    expected = lora_parameter_names(base_config, release.rank, release.alpha, release.targets)
    if len(values) != len(expected):
        raise IncompatibleFile(
            f"{source}: {len(values)} tensors in {release.list_key!r}, but a rank-{release.rank} LoRA on "
            f"{', '.join(release.targets)} of this {base_config.get('_class_name')} has "
            f"{len(expected)} trainable parameters: another base model or LoraConfig")
    wrong = [(name, shape, tuple(v.shape)) for (name, shape), v in zip(expected, values) if tuple(v.shape) != shape]
    if wrong:
        name, want, got = wrong[0]
        raise IncompatibleFile(f"{source}: {len(wrong)} of {len(values)} tensors do not fit their position, the "
                               f"first {name}: {got} in the file, {want} expected")
    bad = [name for (name, _), v in zip(expected, values) if not torch.isfinite(v).all()]
    if bad:
        raise IncompatibleFile(f"{source}: NaN or inf in {bad[:4]}")
    state = {name: v.detach().float().contiguous() for (name, _), v in zip(expected, values)}
    meta = {"format": "pt", "modelspec.title": release.title, "tdm.release": release.title,
            "tdm.converted_from": Path(source).name, STRENGTH_KEY: f"{release.strength:g}",
            "tdm.recommended_cfg": f"{(release.sampling or {}).get('cfg', 1.0):g}",
            "ss_network_dim": str(release.rank), "ss_network_alpha": f"{release.alpha:g}"}
    if release.sampling:
        meta[SETTINGS_KEY] = json.dumps(release.sampling)
        if "timesteps" in release.sampling:
            meta["tdm.timesteps"] = json.dumps(release.sampling["timesteps"])
            meta["tdm.num_steps"] = str(len(release.sampling["timesteps"]))
    return state, meta


def comfyui_state_dict(state: dict[str, torch.Tensor], release: Release) -> dict[str, torch.Tensor]:
    """The ComfyUI file's tensors: diffusers names under ``transformer.`` plus each module's true
    ``.alpha`` (ComfyUI's transformer key maps take these names)."""
    return transformer_alpha_state_dict(state, release.alpha, "transformer")


def convert(checkpoint: str | Path, base: str | Path, out_dir: str | Path, release: Release) -> tuple[Path, Path]:
    """Writes the two LoRA files of ``release``'s checkpoint into ``out_dir``."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    config_path = Path(base)
    if config_path.is_dir():
        config_path = next((p for p in (config_path / "transformer" / "config.json", config_path / "config.json")
                            if p.is_file()), config_path / "transformer" / "config.json")
    if not config_path.is_file():
        raise BadInput(f"--base {base}: no config.json (a pipeline folder with transformer/config.json, a "
                       "transformer folder, or the config file)")
    base_config = read_json_object(config_path, "the base model's config")
    atomic.check_writable_folder(out_dir, "--out")
    values = read_parameter_list(checkpoint, release.list_key)
    state, meta = lora_from_list(values, base_config, release, f"{checkpoint} (base {config_path})")
    meta["tdm.converted_from"] = checkpoint.name
    adapter = {"r": release.rank, "lora_alpha": release.alpha, "target_modules": sorted(release.targets),
               "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False}
    diffusers_meta = {**meta, "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in adapter.items()},
                                                                   sort_keys=True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    diffusers_path, comfy_path = out_dir / DIFFUSERS_FILE, out_dir / COMFYUI_FILE
    atomic.save_safetensors(diffusers_state_dict(state, "transformer"), diffusers_path, diffusers_meta)
    atomic.save_safetensors(comfyui_state_dict(state, release), comfy_path, meta)
    return diffusers_path, comfy_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tdm_train.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the release's .ckpt (a dict with a positional parameter list)")
    parser.add_argument("--release", choices=sorted(RELEASES), required=True,
                        help="which release: its LoraConfig and sampling settings")
    parser.add_argument("--base", required=True, help="the base model's pipeline folder (transformer/config.json) "
                        "or its transformer config.json: only the config is read")
    parser.add_argument("--out", required=True, help="folder for the two LoRA files")
    return parser


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    release = RELEASES[args.release]
    diffusers_path, comfy_path = convert(args.checkpoint, args.base, args.out, release)
    print(f"{release.title}: rank {release.rank}, alpha {release.alpha:g} -> {diffusers_path} (diffusers), "
          f"{comfy_path} (ComfyUI)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
