"""The one interface every runtime of an exported student has: ``runner(**inputs) -> output``,
with the inputs checked against the exported profile first (a clear error instead of a crash deep
inside a runtime). The runtimes themselves live in runtime.py and tensorrt_engine.py."""

from __future__ import annotations

import torch

from .manifest import EngineManifest

TORCH_DTYPES = {
    "float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
ONNX_TYPE_NAMES = {  # ONNX Runtime's type strings
    "tensor(float16)": "float16", "tensor(float)": "float32", "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
}


class ShapeOutsideProfile(ValueError):
    pass


class Runner:
    """Base: input checking; subclasses implement :meth:`_run`."""

    kind = "runner"

    def __init__(self, manifest: EngineManifest):
        self.manifest = manifest

    @property
    def input_names(self) -> list[str]:
        return self.manifest.input_names

    @property
    def memory_bytes(self) -> int:
        """Bytes the loaded network occupies on its device (0 when unknown)."""
        return 0

    def check_inputs(self, feeds: dict[str, torch.Tensor]) -> None:
        names = set(self.input_names)
        missing, extra = names - set(feeds), set(feeds) - names
        if missing or extra:
            raise ValueError(f"{self.kind}: inputs {sorted(feeds)} do not match the exported network's "
                             f"{self.input_names} (missing {sorted(missing)}, unexpected {sorted(extra)})")
        for spec in self.manifest.inputs:
            shape = list(feeds[spec.name].shape)
            if not spec.within_profile(shape):
                bounds = (f"min {spec.profile['min']} / max {spec.profile['max']}" if spec.profile
                          else f"shape {spec.shape}")
                raise ShapeOutsideProfile(
                    f"{self.kind}: input {spec.name!r} has shape {shape}, outside the exported profile ({bounds}). "
                    "Re-export (or rebuild the engine) with a wider --batch/--height/--width range.")

    def __call__(self, **feeds: torch.Tensor) -> torch.Tensor:
        self.check_inputs(feeds)
        return self._run(feeds)

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError
