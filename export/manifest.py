"""``engine.json``: everything a runtime needs to use an exported student without asking the
user — the model family and its ComfyUI signature, prediction type and noise schedule, the TDM
timesteps, every input's name, dtype and min/opt/max shape, and how the export was checked.

The ComfyUI engine loader reads it instead of a model-type dropdown; ``python -m export.trt
inspect`` prints it. One manifest describes one exported network (the ONNX files and any
engines built from them, which are listed under ``engines``)."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from tdm_train import atomic
from tdm_train.errors import IncompatibleFile

MANIFEST_NAME = "engine.json"
FORMAT = "tdm-engine/1"
FAMILIES = ("sdxl", "sd15", "pixart", "cogvideox", "sd3")


@dataclass
class TensorSpec:
    """One network input or output. ``shape`` uses -1 for dynamic axes; ``profile`` gives the
    min / opt / max shape TensorRT builds for (equal entries for a static axis)."""

    name: str
    dtype: str  # "float16" | "float32" | "int64" ...
    shape: list[int]
    profile: dict[str, list[int]] = field(default_factory=dict)

    def within_profile(self, shape) -> bool:
        if not self.profile:
            return len(shape) == len(self.shape) and all(s == d or d == -1 for s, d in zip(shape, self.shape))
        low, high = self.profile["min"], self.profile["max"]
        return len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))


@dataclass
class EngineManifest:
    family: str  # one of FAMILIES
    signature: str  # "diffusers" (exported by the CLI) or "comfyui" (exported by the ComfyUI node)
    prediction_type: str  # epsilon | v_prediction | flow_prediction (SD3)
    scheduler_config: dict
    timesteps: list[int]
    dtype: str  # fp16 | fp32
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx: str = "model.opt.onnx"  # relative to the manifest's folder: the TensorRT build input
    onnx_unoptimized: str = "model.onnx"
    latent: dict = field(default_factory=dict)  # channels, vae_scale_factor, frames (CogVideoX), ...
    conditioning: dict = field(default_factory=dict)  # family details: add_time_embed_dim, text_len, ...
    export: dict = field(default_factory=dict)  # exporter, opset, external data, node counts
    source: dict = field(default_factory=dict)  # base model, LoRA file, strength, sha256
    validation: dict = field(default_factory=dict)  # ONNX Runtime vs PyTorch figures per shape
    versions: dict = field(default_factory=dict)
    engines: list[dict] = field(default_factory=list)  # one entry per TensorRT engine built
    format: str = FORMAT
    # a TDM-unify student (one student for several step counts) is exported for ONE K: its c_K is
    # folded into the network, so it must be sampled with exactly num_steps steps
    num_steps: int | None = None
    unify_steps: list[int] | None = None

    def check_steps(self, num_steps: int) -> None:
        """Refuses sampling an export of a TDM-unify student with another step count than its K."""
        if self.num_steps is not None and int(num_steps) != self.num_steps:
            raise ValueError(f"this export is the {self.num_steps}-step TDM-unify student (c_{self.num_steps} folded "
                             f"in; trained for K = {self.unify_steps}), not a {num_steps}-step one: sample it with "
                             f"{self.num_steps} steps, or export the LoRA again with --num-steps {num_steps}")

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"the exported network has no input {name!r}; it has {[s.name for s in self.inputs]}")

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic.write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = "the manifest") -> EngineManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise IncompatibleFile(f"{where} is not a TDM engine manifest (format {found!r}, expected {FORMAT!r})")
        if data.get("family") not in FAMILIES:
            raise IncompatibleFile(f"{where}: unknown model family {data.get('family')!r}; expected one of {FAMILIES}")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise IncompatibleFile(f"{where} lacks {', '.join(missing)}: it is damaged or from an unfinished "
                                   "export; export the model again")
        data = {k: v for k, v in data.items() if k in known}  # fields of a newer format version are ignored
        try:
            data["inputs"] = [TensorSpec(**s) for s in data["inputs"]]
            data["outputs"] = [TensorSpec(**s) for s in data["outputs"]]
        except TypeError as error:
            raise IncompatibleFile(f"{where}: an input or output entry is malformed ({error})") from None
        return cls(**data)

    @property
    def validation_failed(self) -> bool:
        """The export's own check (ONNX Runtime vs PyTorch at export time) says it is out of tolerance."""
        return self.validation.get("passed") is False

    def refuse_if_unvalidated(self, where: str, force: bool, option: str = "--force") -> None:
        """An export whose validation failed is not used unless asked for explicitly."""
        if self.validation_failed and not force:
            from .validate import ValidationFailed

            reason = self.validation.get("error") or "; ".join(
                f"{c['shape']}: cosine {c['cosine']:.4g}, max |err| {c['max_abs']:.3g}"
                for c in self.validation.get("cases", []) if not c.get("passed", True))
            raise ValidationFailed(f"{where}: this export failed its validation ({reason or 'see engine.json'}); "
                                   f"its outputs are not trusted. Export it again (e.g. --dtype fp32), or pass "
                                   f"{option} to use it anyway")


def manifest_path(path: str | Path) -> Path:
    """engine.json for a folder, an engine/ONNX file inside it, or the manifest itself."""
    path = Path(path)
    if path.is_dir():
        return path / MANIFEST_NAME
    if path.name == MANIFEST_NAME:
        return path
    return path.parent / MANIFEST_NAME


def load_manifest(path: str | Path) -> EngineManifest:
    target = manifest_path(path)
    if not target.is_file():
        raise FileNotFoundError(f"{target} not found: an exported student is a folder made by "
                                "`python -m export.trt onnx` (or the TDM Export node) with its engine.json")
    try:
        data = json.loads(target.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IncompatibleFile(f"{target} is not valid JSON ({error}); re-export the model") from None
    return EngineManifest.from_dict(data, str(target))
