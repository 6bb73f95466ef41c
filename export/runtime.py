"""Runtimes for an exported student, with one interface: ``runner(**inputs) -> output``.

- :class:`TorchRunner` — the PyTorch module that was exported (the reference, and the eager
  side of ``bench``);
- :class:`OnnxRuntimeRunner` — the ONNX file on ONNX Runtime (CPU or CUDA execution provider);
- ``export.tensorrt_engine.TensorRTRunner`` — a TensorRT engine (NVIDIA GPU only).

All take torch tensors named as in ``engine.json``, check them against the exported profile
(a clear error instead of a crash deep inside the runtime), cast them to the network's dtypes,
and return the single output as a float32 torch tensor on the device the inputs came from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tdm_train.errors import IncompatibleFile

from .deps import MissingDependency, require
from .manifest import EngineManifest, load_manifest
from .runner import ONNX_TYPE_NAMES, TORCH_DTYPES, Runner, ShapeOutsideProfile  # noqa: F401  (re-exported)

class TorchRunner(Runner):
    """The exported PyTorch wrapper module itself, called with the same named inputs — in the
    module's own dtype (a float32 reference for an fp16 export), timesteps in float32."""

    kind = "PyTorch"

    def __init__(self, module: torch.nn.Module, manifest: EngineManifest):
        super().__init__(manifest)
        self.module = module
        self.parameter = next(module.parameters())

    @property
    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    @torch.no_grad()
    def _run(self, feeds):
        device = feeds[self.input_names[0]].device
        dtype = self.parameter.dtype
        args = [feeds[spec.name].to(self.parameter.device, torch.float32 if spec.name == "timestep" else dtype)
                for spec in self.manifest.inputs]
        return self.module(*args).float().to(device)


class OnnxRuntimeRunner(Runner):
    """An ONNX file on ONNX Runtime. ``provider`` is "cpu", "cuda" or "auto" (CUDA when the
    onnxruntime-gpu build and a device are there)."""

    kind = "ONNX Runtime"

    def __init__(self, onnx_path: str | Path, manifest: EngineManifest | None = None, provider: str = "cpu",
                 threads: int | None = None, allow_spinning: bool = True):
        ort = require("onnxruntime")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} not found")
        super().__init__(manifest or load_manifest(onnx_path))
        available = ort.get_available_providers()
        if provider == "auto":
            provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
        if wanted not in available:
            raise MissingDependency(f"ONNX Runtime here offers {available}, not {wanted}: "
                                    "pip install onnxruntime-gpu (instead of onnxruntime) for the CUDA provider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the graph optimizer's notes are not the user's business
        if threads:
            options.intra_op_num_threads = threads
        if not allow_spinning:  # idle worker threads otherwise spin and slow down whatever runs next to them
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # a path, not bytes: ONNX Runtime finds the external weight file next to it
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=[wanted])
        except Exception as error:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, Fail, ...
            raise IncompatibleFile(f"{onnx_path} is not an ONNX model ONNX Runtime can load "
                                   f"({' '.join(str(error).split())[:300]}); export it again") from None
        self.provider = provider
        self.path = onnx_path
        self.input_types = {i.name: ONNX_TYPE_NAMES.get(i.type, "float32") for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name
        missing = set(self.manifest.input_names) - set(self.input_types)
        if missing:
            raise ValueError(f"{onnx_path} lacks inputs {sorted(missing)} that {onnx_path.parent}/engine.json lists: "
                             "the file and the manifest come from different exports")

    @property
    def memory_bytes(self) -> int:
        data = self.path.with_name(self.path.name + ".data")
        return self.path.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    def _run(self, feeds):
        device = feeds[self.input_names[0]].device
        arrays = {name: feeds[name].detach().to("cpu", TORCH_DTYPES[self.input_types[name]]).contiguous().numpy()
                  for name in self.input_names}
        (out,) = self.session.run([self.output_name], arrays)
        return torch.from_numpy(out).float().to(device)


def open_runner(path: str | Path, provider: str = "auto") -> Runner:
    """A runner for an exported folder or file: ``*.engine`` / ``*.plan`` on TensorRT; ``*.onnx``
    (or a folder: its optimized ONNX) on ONNX Runtime."""
    path = Path(path)
    manifest = load_manifest(path)
    if path.is_dir():
        path = path / manifest.onnx
    if path.suffix in (".engine", ".plan", ".trt"):
        from .tensorrt_engine import TensorRTRunner

        return TensorRTRunner(path, manifest)
    if path.suffix == ".onnx":
        return OnnxRuntimeRunner(path, manifest, provider=provider)
    raise ValueError(f"{path}: expected an .engine / .plan (TensorRT) or .onnx (ONNX Runtime) file")
