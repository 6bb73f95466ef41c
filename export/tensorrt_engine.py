"""TensorRT engines for an exported student: build, refit and run.

An exported folder holds the ONNX file and its ``engine.json`` (:mod:`export.manifest`). This
module turns it into a TensorRT engine and runs that engine:

- :func:`build_engine` builds one engine from the folder's optimized ONNX through polygraphy's
  builder API (``NetworkFromOnnxPath`` strongly typed, ``CreateConfig``, ``EngineBytesFromNetwork``:
  refittable, timing cache, optimization level, memory limit, progress), with one optimization
  profile taken from the manifest (min / opt / max per input, optionally overridden), writes it next
  to the ONNX under a name that says what it is (:func:`engine_file_name`), and records it under
  ``engines`` in ``engine.json``;
- :func:`refit_engine` swaps the weights of a refittable engine for those of a new ONNX of the same
  graph (another LoRA, another strength) without a rebuild;
- :class:`TensorRTRunner` runs an engine with the :class:`~export.runner.Runner` interface:
  named torch tensors in, one float32 tensor out.

One code path serves TensorRT 10.x and 11.x. The network is strongly typed (the default, and the
only mode, in TensorRT 11), so precision comes from the ONNX itself — it is exported in the target
dtype — and ``BuilderFlag.FP16`` is never set (it no longer exists in TensorRT 11).

``tensorrt`` is imported only inside functions, through :func:`export.deps.require_tensorrt`, so
that this module imports, and its naming and profile code runs, on machines without a GPU.
An engine runs only with the TensorRT version and on the GPU architecture it was built for; both
are in its file name and in its ``engine.json`` entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time
from pathlib import Path

import torch

from tdm_train.atomic import atomic_path

from .deps import require_tensorrt
from .manifest import EngineManifest, TensorSpec, load_manifest
from .runner import Runner, ShapeOutsideProfile

logger = logging.getLogger(__name__)

PROFILE_KEYS = ("min", "opt", "max")
# Letters of the axes written into an engine's file name, per rank of its first input; None marks
# an axis left out (the channels, which never change).
AXIS_LETTERS = {
    4: ("b", None, "h", "w"),  # image latents [batch, channels, height, width]
    5: ("b", "f", None, "h", "w"),  # CogVideoX latents [batch, frames, channels, height, width]
}

ProfileShapes = dict[str, tuple[list[int], list[int], list[int]]]


# ----------------------------------------------------------------------------------------------
# Names and profiles (no TensorRT needed)
# ----------------------------------------------------------------------------------------------


def _filename_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip("-.") or "unknown"


def _short_version(trt_version: str) -> str:
    # "10.13.3.9" -> "10.13.3": the build number does not change engine compatibility
    match = re.match(r"\d+(?:\.\d+){0,2}", trt_version)
    return match.group(0) if match else _filename_safe(trt_version)


def _axis_range(low: int, opt: int, high: int) -> str:
    return str(low) if low == opt == high else f"{low}-{opt}-{high}"


def engine_file_name(manifest: EngineManifest, trt_version: str, compute_capability: str,
                     profile: ProfileShapes | None = None) -> str:
    """The file name of an engine built from ``manifest``: family, dtype, the min-opt-max of the
    first input's batch / frames / height / width (latent units, as in the profile; one number for a
    static axis), the TensorRT version and the GPU's compute capability, e.g.
    ``sdxl_fp16_b1-1-4_h64-128-128_w64-128-128_trt10.13.3_sm89.engine``.

    ``profile`` (from :func:`optimization_profile_shapes`) is the one the engine is built with;
    by default, the manifest's own."""
    profile = profile if profile is not None else optimization_profile_shapes(manifest)
    first = manifest.inputs[0]
    low, opt, high = profile[first.name]
    letters = AXIS_LETTERS.get(len(low), ("b",))
    axes = [f"{letter}{_axis_range(low[i], opt[i], high[i])}" for i, letter in enumerate(letters) if letter]
    parts = [_filename_safe(manifest.family), _filename_safe(manifest.dtype), *axes,
             f"trt{_short_version(trt_version)}", f"sm{_filename_safe(compute_capability).replace('.', '')}"]
    return "_".join(parts) + ".engine"


def _spec_profile(spec: TensorSpec) -> dict[str, list[int]]:
    if spec.profile:
        return {key: list(spec.profile[key]) for key in PROFILE_KEYS}
    if -1 in spec.shape:
        raise ValueError(f"input {spec.name!r} has dynamic axes {spec.shape} but no min/opt/max profile in "
                         "engine.json; re-export the model or pass a profile override for it")
    return {key: list(spec.shape) for key in PROFILE_KEYS}


def _check_profile(spec: TensorSpec, profile: dict[str, list[int]]) -> None:
    rank = len(spec.shape)
    for key in PROFILE_KEYS:
        if len(profile[key]) != rank:
            raise ValueError(f"input {spec.name!r}: {key} shape {profile[key]} has {len(profile[key])} axes, "
                             f"the input has {rank} ({spec.shape})")
    for axis, (low, opt, high) in enumerate(zip(*(profile[key] for key in PROFILE_KEYS))):
        if not 1 <= low <= opt <= high:
            raise ValueError(f"input {spec.name!r}, axis {axis}: needs 1 <= min <= opt <= max, "
                             f"got min {low}, opt {opt}, max {high}")
        static = spec.shape[axis]
        if static != -1 and not low == opt == high == static:
            raise ValueError(f"input {spec.name!r}, axis {axis} is static ({static}) in the exported network "
                             f"({spec.shape}); its profile cannot be min {low} / opt {opt} / max {high}")


def optimization_profile_shapes(manifest: EngineManifest,
                                overrides: dict[str, dict[str, list[int]]] | None = None) -> ProfileShapes:
    """``{input name: (min, opt, max)}`` for the engine's optimization profile: each input's profile
    from ``engine.json``, with ``overrides`` (``{name: {"min": [...], "opt": [...], "max": [...]}}``,
    any subset of the three) replacing parts of it. Raises ValueError for an unknown input, a wrong
    rank, min <= opt <= max broken, or a change to an axis that is static in the exported network."""
    overrides = overrides or {}
    unknown = set(overrides) - set(manifest.input_names)
    if unknown:
        raise ValueError(f"profile overrides for {sorted(unknown)}: the exported network has no such input "
                         f"(its inputs are {manifest.input_names})")
    shapes: ProfileShapes = {}
    for spec in manifest.inputs:
        override = overrides.get(spec.name, {})
        bad_keys = set(override) - set(PROFILE_KEYS)
        if bad_keys:
            raise ValueError(f"profile override for {spec.name!r} has keys {sorted(bad_keys)}; "
                             f"expected some of {list(PROFILE_KEYS)}")
        profile = _spec_profile(spec) | {key: [int(v) for v in value] for key, value in override.items()}
        _check_profile(spec, profile)
        shapes[spec.name] = (profile["min"], profile["opt"], profile["max"])
    return shapes


def _compute_capability() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def _manifest_if_any(path: Path) -> EngineManifest | None:
    try:
        return load_manifest(path)
    except (FileNotFoundError, ValueError):
        return None


def _engine_entry(manifest: EngineManifest | None, engine_path: Path) -> dict | None:
    """The ``engine.json`` record of the engine file, if it has one."""
    if manifest is None:
        return None
    return next((entry for entry in manifest.engines if entry.get("file") == engine_path.name), None)


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def _strongly_typed(trt) -> bool | None:
    # TensorRT 10 needs STRONGLY_TYPED to take the precision from the ONNX; in TensorRT 11 every
    # network is strongly typed and the flag may be gone (then polygraphy is told nothing)
    flag_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return True if getattr(flag_enum, "STRONGLY_TYPED", None) is not None else None


def _check_network_inputs(network, shapes: ProfileShapes, onnx_path: Path) -> None:
    # every network input needs a profile; a mismatch means the ONNX and engine.json disagree
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(shapes):
        raise ValueError(f"{onnx_path} has inputs {sorted(names)} but engine.json lists {sorted(shapes)}: "
                         "the ONNX file and the manifest come from different exports")


def builder_options(shapes: ProfileShapes, *, refit: bool, timing_cache: Path | None, optimization_level: int,
                    workspace_bytes: int | None, weight_streaming: bool) -> dict:
    """The keyword arguments of polygraphy's ``CreateConfig`` for one build, without TensorRT objects:
    one optimization profile (min / opt / max per input), refittable, the builder optimization
    level, a timing cache to load, weight streaming, and the workspace limit in bytes (the caller
    turns it into ``{trt.MemoryPoolType.WORKSPACE: bytes}``). Precision flags are never set: the
    network is strongly typed."""
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"builder optimization level {optimization_level}: TensorRT takes 0-5 (3 is its default)")
    options = {"profiles": [{name: tuple(shape) for name, shape in shapes.items()}],
               "refittable": bool(refit), "builder_optimization_level": int(optimization_level),
               "weight_streaming": bool(weight_streaming)}
    if timing_cache is not None:
        options["load_timing_cache"] = str(timing_cache)  # polygraphy starts a new cache when the file is absent
    if workspace_bytes is not None:
        options["workspace_bytes"] = int(workspace_bytes)
    return options


def polygraphy_config(options: dict, workspace_pool=None, progress_monitor=None):
    """polygraphy's ``CreateConfig`` for :func:`builder_options`' options (building it needs no GPU;
    calling it, at build time, does). ``workspace_pool``: ``trt.MemoryPoolType.WORKSPACE``."""
    from polygraphy.backend.trt import CreateConfig, Profile

    kwargs = dict(options)
    profiles = []
    for profile_shapes in kwargs.pop("profiles"):
        profile = Profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.add(name, min=low, opt=opt, max=high)
        profiles.append(profile)
    workspace = kwargs.pop("workspace_bytes", None)
    if workspace is not None:
        kwargs["memory_pool_limits"] = {workspace_pool: workspace}
    if progress_monitor is not None:
        kwargs["progress_monitor"] = progress_monitor
    return CreateConfig(profiles=profiles, **kwargs)


def _polygraphy_build(trt, onnx_path: Path, shapes: ProfileShapes, options: dict, timing_cache: Path | None,
                      progress: bool) -> bytes:
    """The serialized engine, built by polygraphy's builder API: the network parsed from the ONNX
    path (external weights found beside it), strongly typed; ``CreateConfig`` from
    :func:`builder_options`; ``EngineBytesFromNetwork``, which also saves the timing cache."""
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    try:
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=_strongly_typed(trt))()
    except Exception as error:  # polygraphy logs every parser error, then raises
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {error}") from None
    _check_network_inputs(network[1], shapes, onnx_path)
    config = polygraphy_config(options, trt.MemoryPoolType.WORKSPACE, _progress_monitor(trt) if progress else None)
    try:
        return bytes(EngineBytesFromNetwork(network, config=config,
                                            save_timing_cache=str(timing_cache) if timing_cache else None)())
    except Exception as error:  # polygraphy raises when TensorRT returns no plan
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} ({error}; see the TensorRT log "
                           "above). Out of GPU memory is the usual cause: narrow the profile (smaller max batch / "
                           "size), or close other programs using the GPU.") from None


def _progress_monitor(trt):
    """A ``trt.IProgressMonitor`` showing each build phase as a tqdm bar (nested phases below
    their parent). The class is made here because its base class lives in the lazy import.

    TensorRT calls it from several builder threads (hence the lock), and cancels the build if a
    method raises or ``step_complete`` returns False."""
    from tqdm.auto import tqdm

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()
            self.bars = {}
            self.depths = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                depth = self.depths.get(parent_phase, -1) + 1
                self.depths[phase_name] = depth
                self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=depth, leave=depth == 0,
                                             dynamic_ncols=True)

        def step_complete(self, phase_name, step):
            with self.lock:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(max(0, min(step + 1, bar.total) - bar.n))  # steps count from 0
            return True

        def phase_finish(self, phase_name):
            with self.lock:
                self.depths.pop(phase_name, None)
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor()


def _write_bytes(path: Path, data) -> None:
    # data is bytes or a TensorRT IHostMemory (which has the buffer protocol)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def build_engine(folder: str | Path, *, profile_overrides: dict[str, dict[str, list[int]]] | None = None,
                 refit: bool = True, timing_cache: Path | None = None, optimization_level: int = 3,
                 workspace_gb: float | None = None, weight_streaming: bool = False, progress: bool = True) -> Path:
    """Build a TensorRT engine from the exported ``folder`` (its ``engine.json`` and optimized ONNX)
    for the GPU this runs on; write it into the folder, record it in ``engine.json``, and return its path.

    Args:
        profile_overrides: min / opt / max shapes replacing the manifest's, per input
            (see :func:`optimization_profile_shapes`). A narrower range builds faster and uses less memory.
        refit: build a refittable engine, so that :func:`refit_engine` can swap in new weights (a LoRA).
        timing_cache: a file of kernel timings to reuse and update; only for the same GPU and TensorRT.
        optimization_level: the builder optimization level, 0-5 (3 is TensorRT's and NVIDIA's default).
        workspace_gb: a cap on the builder's scratch memory.
        weight_streaming: allow streaming weights from host memory at run time (GPUs too small for them).
        progress: show the build phases as progress bars.
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    onnx_path = folder / manifest.onnx
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} not found: export the model first (`python -m export.trt onnx`)")
    shapes = optimization_profile_shapes(manifest, profile_overrides)
    trt = require_tensorrt()

    options = builder_options(shapes, refit=refit, timing_cache=timing_cache, optimization_level=optimization_level,
                              workspace_bytes=None if workspace_gb is None else int(workspace_gb * 2**30),
                              weight_streaming=weight_streaming)
    start = time.perf_counter()
    plan = _polygraphy_build(trt, onnx_path, shapes, options, timing_cache, progress)
    build_seconds = time.perf_counter() - start

    compute_capability = _compute_capability()
    engine_path = folder / engine_file_name(manifest, trt.__version__, compute_capability, profile=shapes)
    _write_bytes(engine_path, plan)
    entry = {
        "file": engine_path.name,
        "tensorrt": trt.__version__,
        "compute_capability": compute_capability,
        "gpu": torch.cuda.get_device_name(),
        "refit": refit,
        "weight_streaming": weight_streaming,
        "profile": {name: dict(zip(PROFILE_KEYS, shape)) for name, shape in shapes.items()},
        "build_seconds": round(build_seconds, 1),
        "size_bytes": engine_path.stat().st_size,
        "optimization_level": optimization_level,
    }
    # a rebuild under the same name replaces its old record
    manifest.engines = [e for e in manifest.engines if e.get("file") != engine_path.name] + [entry]
    manifest.save(folder)
    return engine_path


# ----------------------------------------------------------------------------------------------
# Load and refit
# ----------------------------------------------------------------------------------------------


def _deserialize(trt, runtime, engine_path: Path, manifest: EngineManifest | None = None):
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is not None:
        return engine
    here = f"TensorRT {trt.__version__} on sm{_compute_capability()} ({torch.cuda.get_device_name()})"
    entry = _engine_entry(manifest, engine_path)
    if entry:
        built = (f"it was built with TensorRT {entry.get('tensorrt')} for sm{entry.get('compute_capability')} "
                 f"({entry.get('gpu')}); this is {here}")
    else:
        built = f"this is {here}, and the engine may come from another TensorRT version or GPU"
    raise RuntimeError(f"TensorRT could not load {engine_path}: {built}. An engine runs only with the TensorRT "
                       "version and on the GPU architecture it was built for: rebuild it here "
                       "(`python -m export.trt build` on its folder).")


def check_refit_steps(engine_manifest: EngineManifest | None, onnx_manifest: EngineManifest | None) -> None:
    """An engine keeps its engine.json: refitting it with the weights of another K of a TDM-unify
    student (or of a fixed-K student into a unify engine) would leave that record wrong."""
    if engine_manifest is None or onnx_manifest is None:
        return
    if engine_manifest.num_steps != onnx_manifest.num_steps:
        def what(m):
            return f"the K={m.num_steps} TDM-unify student" if m.num_steps is not None else "a fixed-K student"
        raise ValueError(f"refit: the engine is {what(engine_manifest)}, the ONNX {what(onnx_manifest)}: its c_K is "
                         "part of the weights and engine.json records the engine's K; build a new engine instead")


def refit_engine(engine_path: str | Path, onnx_path: str | Path) -> int:
    """Replace the weights of a refittable engine (built with ``refit=True``) by those of
    ``onnx_path``, in place; return the number of weights refitted.

    TensorRT matches weights by ONNX initializer name, so the new ONNX must be the same graph
    exported by the same exporter and opset (e.g. the same student with another LoRA merged in):
    initializer names differ between exporters and a mismatch leaves weights missing."""
    engine_path, onnx_path = Path(engine_path), Path(onnx_path)
    for path in (engine_path, onnx_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    check_refit_steps(_manifest_if_any(engine_path), _manifest_if_any(onnx_path))
    trt = require_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(trt_logger, "")
    runtime = trt.Runtime(trt_logger)
    engine = _deserialize(trt, runtime, engine_path, _manifest_if_any(engine_path))
    if not engine.refittable:
        raise RuntimeError(f"{engine_path} is not refittable: it was built without --refit (BuilderFlag.REFIT). "
                           "Rebuild it with refit enabled, or build a new engine from the new ONNX.")

    refitter = trt.Refitter(engine, trt_logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, trt_logger)
    if not onnx_refitter.refit_from_file(str(onnx_path)):
        errors = [str(onnx_refitter.get_error(i)) for i in range(onnx_refitter.num_errors)]
        raise RuntimeError(f"TensorRT could not take the weights of {onnx_path} for {engine_path}:\n  "
                           + "\n  ".join(errors or ["(no details)"]))
    missing = list(refitter.get_missing_weights())
    if missing:
        raise RuntimeError(f"{onnx_path} lacks {len(missing)} weight(s) the engine needs, e.g. {missing[:5]}: "
                           "it must be exported by the same exporter and opset as the engine's ONNX")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT failed to refit {engine_path} (see the TensorRT log above)")
    _write_bytes(engine_path, engine.serialize())
    return len(refitter.get_all_weights())


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    dtypes = {
        trt.float16: torch.float16, trt.float32: torch.float32, trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool,
    }
    if trt_dtype not in dtypes:
        raise TypeError(f"the engine uses {trt_dtype}, which this runner does not handle")
    return dtypes[trt_dtype]


def _device_memory_bytes(engine) -> int:
    # the first TensorRT 10 releases only have device_memory_size, which TensorRT 11 removed
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def _with_engine_profile(manifest: EngineManifest, engine_path: Path) -> EngineManifest:
    """The manifest with each input's profile replaced by the one the engine was built with (build
    overrides may differ from the export's), so that inputs are checked against the engine."""
    entry = _engine_entry(manifest, engine_path)
    if not entry or not entry.get("profile"):
        return manifest
    inputs = [dataclasses.replace(spec, profile=entry["profile"].get(spec.name, spec.profile))
              for spec in manifest.inputs]
    return dataclasses.replace(manifest, inputs=inputs)


class TensorRTRunner(Runner):
    """A TensorRT engine on one CUDA device (``device``: default, the current one).

    The engine is deserialized on the first call or on :meth:`load` (an engine takes GPU memory
    from then on) and freed by :meth:`unload`. Inputs are checked against the engine's profile
    (from ``engine.json``), moved to the device and cast to the engine's dtypes; the output comes
    back as float32 on the device the first input came from."""

    kind = "TensorRT"

    def __init__(self, engine_path: str | Path, manifest: EngineManifest | None = None,
                 device: str | torch.device | None = None):
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"{engine_path} not found")
        super().__init__(_with_engine_profile(manifest or load_manifest(engine_path), engine_path))
        self.path = engine_path
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, not {self.device}")
        self.engine = self.context = self.runtime = self.trt_logger = None
        self.dtypes: dict[str, torch.dtype] = {}
        self.engine_inputs: list[str] = []
        self.engine_outputs: list[str] = []
        self.output_name: str | None = None

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    @property
    def memory_bytes(self) -> int:
        """The engine file's size, plus the engine's scratch memory once it is loaded."""
        size = self.path.stat().st_size
        return size + _device_memory_bytes(self.engine) if self.loaded else size

    def _device_scope(self):
        # TensorRT allocates on, and runs on, the current CUDA device
        if self.device.index == torch.cuda.current_device():
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    def load(self) -> TensorRTRunner:
        if self.loaded:
            return self
        trt = require_tensorrt()
        if self.device is None or self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.trt_logger, "")
        with self._device_scope():
            self.runtime = trt.Runtime(self.trt_logger)  # kept with the engine it deserializes
            engine = _deserialize(trt, self.runtime, self.path, self.manifest)
            self._read_io(trt, engine)
            context = engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path} "
                               "(out of GPU memory?)")
        self.engine, self.context = engine, context
        return self

    def _read_io(self, trt, engine) -> None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.engine_inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.engine_outputs = [n for n in names if n not in self.engine_inputs]
        unknown = set(self.engine_inputs) - set(self.input_names)
        if unknown or not self.engine_outputs:
            raise ValueError(f"{self.path} has inputs {self.engine_inputs} and outputs {self.engine_outputs}, but "
                             f"engine.json lists inputs {self.input_names}: the engine and the manifest come "
                             "from different exports")
        self.dtypes = {name: _torch_dtype(trt, engine.get_tensor_dtype(name)) for name in names}
        wanted = self.manifest.outputs[0].name if self.manifest.outputs else None
        self.output_name = wanted if wanted in self.engine_outputs else self.engine_outputs[0]

    def unload(self) -> None:
        """Free the engine's GPU memory; the next call loads it again."""
        # the context before the engine, the engine before the runtime
        self.context = None
        self.engine = None
        self.runtime = None

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            raise ShapeOutsideProfile(f"{self.kind}: input {name!r} has shape {list(shape)}, outside the engine's "
                                      f"profile (min {list(low)} / max {list(high)}); rebuild the engine with a "
                                      "wider profile")

    def _run(self, feeds):
        self.load()
        source_device = feeds[self.input_names[0]].device
        with self._device_scope():
            # kept referenced until execute_async_v3 returns; after that the caching allocator may
            # reuse them, which is safe because reuse is ordered on the same (current) stream
            inputs = {name: feeds[name].detach().to(self.device, self.dtypes[name]).contiguous()
                      for name in self.engine_inputs}
            for name, tensor in inputs.items():
                self._set_input_shape(name, tuple(tensor.shape))
            outputs = {name: self._empty_output(name) for name in self.engine_outputs}
            for name, tensor in (inputs | outputs).items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            # torch's current stream, not a private one: ComfyUI_TensorRT got black images from a
            # private stream that was not ordered with the surrounding torch work
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path} (see the TensorRT log above)")
        return outputs[self.output_name].float().to(source_device)

    def _empty_output(self, name: str) -> torch.Tensor:
        shape = tuple(self.context.get_tensor_shape(name))  # known once every input shape is set
        if any(size < 0 for size in shape):
            raise RuntimeError(f"TensorRT could not infer the shape of output {name!r} ({list(shape)})")
        return torch.empty(shape, dtype=self.dtypes[name], device=self.device)
