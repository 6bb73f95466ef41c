"""Runtimes for an exported student, with one interface: ``runner(**inputs) -> output``.

- :class:`TorchRunner` — the PyTorch module that was exported (the reference, and the eager
  side of ``bench``);
- :class:`OnnxRuntimeRunner` — the ONNX file on ONNX Runtime (CPU or CUDA execution provider);
- :class:`OpenVINORunner` — the ONNX file compiled by OpenVINO for the CPU, at f32 or bf16 (the
  CPU's AMX / AVX-512 bf16 units) inference precision;
- ``export.tensorrt_engine.TensorRTRunner`` — a TensorRT engine (NVIDIA GPU only).

All take torch tensors named as in ``engine.json``, check them against the exported profile
(a clear error instead of a crash deep inside the runtime), cast them to the network's dtypes,
and return the single output as a float32 torch tensor on the device the inputs came from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tdm_train.errors import IncompatibleFile

from .deps import OPENVINO_EXTRA, MissingDependency, require
from .manifest import EngineManifest, load_manifest
from .runner import ONNX_TYPE_NAMES, TORCH_DTYPES, Runner, ShapeOutsideProfile  # noqa: F401  (re-exported)

class TorchRunner(Runner):
    """The exported PyTorch wrapper module itself, called with the same named inputs — in the
    module's own dtype (a float32 reference for an fp16 export), timesteps in float32."""

    kind = "PyTorch"

    def __init__(self, module: torch.nn.Module, manifest: EngineManifest, autocast: torch.dtype | None = None):
        super().__init__(manifest)
        self.module = module
        self.parameter = next(module.parameters())
        self.autocast = autocast  # e.g. torch.bfloat16: PyTorch's own mixed precision (CPU autocast, AMX)

    @property
    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    @torch.no_grad()
    def _run(self, feeds):
        device = feeds[self.input_names[0]].device
        dtype = self.parameter.dtype
        args = [feeds[spec.name].to(self.parameter.device, torch.float32 if spec.name == "timestep" else dtype)
                for spec in self.manifest.inputs]
        if self.autocast is None:
            return self.module(*args).float().to(device)
        with torch.autocast(self.parameter.device.type, dtype=self.autocast):
            return self.module(*args).float().to(device)


def resolve_provider(provider: str) -> str:
    """ONNX Runtime's "auto" -> "cuda" when its CUDA provider is here (onnxruntime-gpu), else "cpu"."""
    if provider != "auto":
        return provider
    try:
        import onnxruntime
    except ImportError:
        return "cpu"  # the runner names the missing package
    return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


class _OnnxFileRunner(Runner):
    """What the runtimes of an ONNX file share: its inputs checked against engine.json, its size on
    disk (external data included), and host arrays in the file's input dtypes. Subclasses set
    ``path`` and ``input_types`` (input name -> dtype name)."""

    path: Path
    input_types: dict[str, str]

    def _check_file_inputs(self) -> None:
        missing = set(self.manifest.input_names) - set(self.input_types)
        if missing:
            raise ValueError(f"{self.path} lacks inputs {sorted(missing)} that {self.path.parent}/engine.json lists: "
                             "the file and the manifest come from different exports")

    @property
    def memory_bytes(self) -> int:
        data = self.path.with_name(self.path.name + ".data")
        return self.path.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    def _host_arrays(self, feeds) -> dict:
        return {name: feeds[name].detach().to("cpu", TORCH_DTYPES[self.input_types[name]]).contiguous().numpy()
                for name in self.input_names}


class OnnxRuntimeRunner(_OnnxFileRunner):
    """An ONNX file on ONNX Runtime. ``provider`` is "cpu", "cuda" or "auto" (CUDA when the
    onnxruntime-gpu build and a device are there)."""

    kind = "ONNX Runtime"

    def __init__(self, onnx_path: str | Path, manifest: EngineManifest | None = None, provider: str = "cpu",
                 threads: int | None = None, allow_spinning: bool = True, io_binding: bool | None = None):
        ort = require("onnxruntime")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} not found")
        super().__init__(manifest or load_manifest(onnx_path))
        available = ort.get_available_providers()
        provider = resolve_provider(provider)
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
        # IO binding (default on CUDA): inputs and the output stay torch tensors on the device, bound by
        # pointer, with no host round trip per call
        self.io_binding = provider == "cuda" if io_binding is None else io_binding
        self.path = onnx_path
        self.input_types = {i.name: ONNX_TYPE_NAMES.get(i.type, "float32") for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name
        self._check_file_inputs()

    def _run(self, feeds):
        device = feeds[self.input_names[0]].device
        if self.io_binding:
            return self._run_bound(feeds).float().to(device)
        arrays = self._host_arrays(feeds)
        (out,) = self.session.run([self.output_name], arrays)
        return torch.from_numpy(out).float().to(device)

    def _run_bound(self, feeds) -> torch.Tensor:
        """One call through ``session.io_binding()``: each input a contiguous torch tensor on the
        provider's device in the network's dtype, the output written into a torch tensor there (the
        latent's shape: every family's output is shaped as its ``sample`` input)."""
        import numpy as np

        where = "cuda" if self.provider == "cuda" else "cpu"
        device = torch.device("cuda", torch.cuda.current_device()) if where == "cuda" else torch.device("cpu")
        binding = self.session.io_binding()
        inputs = {name: feeds[name].detach().to(device, TORCH_DTYPES[self.input_types[name]]).contiguous()
                  for name in self.input_names}
        for name, tensor in inputs.items():
            binding.bind_input(name, where, device.index or 0, np.dtype(self.input_types[name]), list(tensor.shape),
                               tensor.data_ptr())
        out_type = ONNX_TYPE_NAMES.get(self.session.get_outputs()[0].type, "float32")
        output = torch.empty(inputs["sample"].shape, dtype=TORCH_DTYPES[out_type], device=device)
        binding.bind_output(self.output_name, where, device.index or 0, np.dtype(out_type), list(output.shape),
                            output.data_ptr())
        if where == "cuda":
            torch.cuda.current_stream().synchronize()  # the inputs are written before ONNX Runtime reads them
        self.session.run_with_iobinding(binding)
        return output


OPENVINO_PRECISIONS = ("f32", "bf16")


def instruction_sets() -> str:
    """What each CPU runtime can use here: torch's kernel level, OpenVINO's capabilities, the
    CPU's AVX-512 / AMX flags."""
    parts = [f"PyTorch CPU kernels: {torch.backends.cpu.get_cpu_capability()}"]
    try:
        import openvino

        parts.append(f"OpenVINO CPU: {', '.join(openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}")
    except ImportError:
        parts.append("OpenVINO: not installed")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        parts.append("CPU flags: " + " ".join(sorted(f for f in flags if f.startswith(("avx512", "amx")))))
    except (OSError, StopIteration):
        pass
    return "; ".join(parts)


class OpenVINORunner(_OnnxFileRunner):
    """An ONNX file compiled by OpenVINO for the CPU. ``precision`` is its inference precision hint:
    "f32", or "bf16" where the CPU has bf16 units (refused, with what the CPU offers, where not).
    Dynamic axes stay dynamic (OpenVINO reads them from the ONNX file); latency mode, one request."""

    kind = "OpenVINO"

    def __init__(self, onnx_path: str | Path, manifest: EngineManifest | None = None, precision: str = "f32",
                 threads: int | None = None):
        ov = require("openvino", OPENVINO_EXTRA)
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} not found")
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r}: expected one of {OPENVINO_PRECISIONS}")
        super().__init__(manifest or load_manifest(onnx_path))
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in capabilities:
            raise MissingDependency(f"this CPU offers {capabilities} to OpenVINO, no BF16 units: use precision f32")
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        except Exception as error:  # noqa: BLE001 - OpenVINO's RuntimeError subclasses
            raise IncompatibleFile(f"{onnx_path}: OpenVINO cannot compile it ({' '.join(str(error).split())[:300]})") \
                from None
        self.request = self.compiled.create_infer_request()
        self.precision, self.path = precision, onnx_path
        # an input port can carry several tensor names (OpenVINO folds identity casts into the input), so
        # each engine.json name is looked up among all of them, not get_any_name()'s pick
        self.ports = {name: port for port in self.compiled.inputs for name in port.get_names()}
        self.input_types = {name: port.get_element_type().to_dtype().name for name, port in self.ports.items()}
        self._check_file_inputs()

    def _run(self, feeds):
        device = feeds[self.input_names[0]].device
        arrays = self._host_arrays(feeds)
        out = self.request.infer({self.ports[name]: array for name, array in arrays.items()})[self.compiled.output(0)]
        return torch.from_numpy(out.copy()).float().to(device)


def open_runner(path: str | Path, provider: str = "auto") -> Runner:
    """A runner for an exported folder or file: ``*.engine`` / ``*.plan`` on TensorRT; ``*.onnx``
    (or a folder: its optimized ONNX) on ONNX Runtime, or on OpenVINO with ``provider``
    "openvino" (f32) / "openvino-bf16"."""
    path = Path(path)
    manifest = load_manifest(path)
    if path.is_dir():
        path = path / manifest.onnx
    if path.suffix in (".engine", ".plan", ".trt"):
        from .tensorrt_engine import TensorRTRunner

        return TensorRTRunner(path, manifest)
    if path.suffix == ".onnx":
        if provider.startswith("openvino"):
            return OpenVINORunner(path, manifest, precision="bf16" if provider == "openvino-bf16" else "f32")
        return OnnxRuntimeRunner(path, manifest, provider=provider)
    raise ValueError(f"{path}: expected an .engine / .plan (TensorRT) or .onnx (ONNX Runtime) file")
