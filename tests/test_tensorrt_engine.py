"""TensorRT engines: names, optimization profiles, build, refit and the runner.

Without a GPU the build / refit / load code runs against a fake ``tensorrt`` module that records
what it is asked to do (the real bindings follow TensorRT 10.x / 11.x). With tensorrt and a CUDA
device, a tiny Conv2d ONNX is built into a real engine and compared with torch."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from export import tensorrt_engine as te
from export.deps import MissingDependency
from export.manifest import EngineManifest, TensorSpec, load_manifest
from export.runtime import ShapeOutsideProfile

GPU_NAME = "NVIDIA GeForce RTX 4090"


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------


def _spec(name, dtype, shape, low=None, opt=None, high=None):
    profile = {"min": low, "opt": opt, "max": high} if low is not None else {}
    return TensorSpec(name=name, dtype=dtype, shape=shape, profile=profile)


def sdxl_manifest(**changes) -> EngineManifest:
    fields = dict(
        family="sdxl", signature="diffusers", prediction_type="epsilon", scheduler_config={},
        timesteps=[899, 674, 449, 224], dtype="fp16",
        inputs=[
            _spec("sample", "float16", [-1, 4, -1, -1], [1, 4, 64, 64], [1, 4, 128, 128], [4, 4, 128, 128]),
            _spec("timestep", "float32", [-1], [1], [1], [4]),
            _spec("encoder_hidden_states", "float16", [-1, 77, 2048], [1, 77, 2048], [1, 77, 2048], [4, 77, 2048]),
            _spec("text_embeds", "float16", [-1, 1280], [1, 1280], [1, 1280], [4, 1280]),
            _spec("time_ids", "float16", [-1, 6], [1, 6], [1, 6], [4, 6]),
        ],
        outputs=[TensorSpec(name="latent", dtype="float16", shape=[-1, 4, -1, -1])],
    )
    return EngineManifest(**(fields | changes))


def cogvideox_manifest() -> EngineManifest:
    return EngineManifest(
        family="cogvideox", signature="diffusers", prediction_type="v_prediction", scheduler_config={},
        timesteps=[999, 749, 499, 249], dtype="fp16",
        inputs=[
            _spec("hidden_states", "float16", [-1, 13, 16, 60, 90],
                  [1, 13, 16, 60, 90], [1, 13, 16, 60, 90], [2, 13, 16, 60, 90]),
            _spec("timestep", "int64", [-1], [1], [1], [2]),
            _spec("encoder_hidden_states", "float16", [-1, 226, 4096],
                  [1, 226, 4096], [1, 226, 4096], [2, 226, 4096]),
        ],
        outputs=[TensorSpec(name="noise_pred", dtype="float16", shape=[-1, 13, 16, 60, 90])],
    )


@pytest.fixture
def exported(tmp_path) -> Path:
    """An exported SDXL-like folder: engine.json and a (placeholder) optimized ONNX."""
    manifest = sdxl_manifest()
    manifest.save(tmp_path)
    (tmp_path / manifest.onnx).write_bytes(b"onnx placeholder")
    return tmp_path


# ----------------------------------------------------------------------------------------------
# A fake tensorrt module
# ----------------------------------------------------------------------------------------------


class FakeTensorRT:
    """A ``tensorrt`` stand-in with the TensorRT 10/11 Python API surface the module uses. Tests
    set what it returns (``plan``, ``parse_errors``, ``refittable``...) and read what it was asked
    (``network_flags``, ``profile``, ``flags``...)."""

    def __init__(self, version="10.13.3.9", strongly_typed_flag=True):
        self.network_inputs = sdxl_manifest().input_names
        self.parse_errors: list[str] = []
        self.plan: bytes | None = b"serialized engine"
        self.timing_cache_bytes = b"timings after the build"
        self.timing_cache_matches = True  # False: a saved cache is from another GPU / TensorRT
        self.engine_loads = True
        self.refittable = True
        self.refitted_plan = b"refitted engine"
        self.missing_weights: list[str] = []
        self.all_weights = ["conv.weight", "conv.bias", "proj.weight"]
        self.io = [("sample", "INPUT", "float16"), ("timestep", "INPUT", "float32"),
                   ("encoder_hidden_states", "INPUT", "float16"), ("text_embeds", "INPUT", "float16"),
                   ("time_ids", "INPUT", "float16"), ("latent", "OUTPUT", "float16")]
        self.device_memory = 123_456
        # what was asked
        self.network_flags = None
        self.parsed = None
        self.profile: dict = {}
        self.flags: set = set()
        self.config = None
        self.deserialized = None
        self.refit_onnx = None
        self.refitted = False
        self.monitor_calls: list = []
        self.module = self._module(version, strongly_typed_flag)

    def _module(self, version, strongly_typed_flag):
        fake = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = version
        for name in ("float16", "float32", "bfloat16", "int32", "int64", "bool"):
            setattr(trt, name, name)

        class Logger:
            WARNING, INFO, ERROR = "WARNING", "INFO", "ERROR"

            def __init__(self, severity=None):
                self.severity = severity

        trt.Logger = Logger
        flags = {"EXPLICIT_BATCH": 0} | ({"STRONGLY_TYPED": 1} if strongly_typed_flag else {})
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        trt.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", WEIGHT_STREAMING="WEIGHT_STREAMING", FP16="FP16")
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        trt.init_libnvinfer_plugins = lambda logger, namespace: True

        class IProgressMonitor:
            def __init__(self):
                pass

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return fake.timing_cache_bytes

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.profile[name] = (list(low), list(opt), list(high))

        class Config:
            def __init__(self):
                self.builder_optimization_level = None
                self.progress_monitor = None
                self.memory_pool_limits = {}
                self.profiles = []
                self.timing_cache = None

            def set_flag(self, flag):
                fake.flags.add(flag)

            def set_memory_pool_limit(self, pool, size):
                self.memory_pool_limits[pool] = size

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

            def create_timing_cache(self, data):
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.data and not fake.timing_cache_matches and not ignore_mismatch:
                    return False
                self.timing_cache = (cache.data, ignore_mismatch)
                return True

            def get_timing_cache(self):
                return TimingCache(self.timing_cache[0])

        class Network:
            num_inputs = property(lambda self: len(fake.network_inputs))

            def get_input(self, index):
                return types.SimpleNamespace(name=fake.network_inputs[index])

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags=0):
                fake.network_flags = flags
                return Network()

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                monitor = config.progress_monitor
                if monitor is not None:
                    monitor.phase_start("Building engine", None, 2)
                    monitor.phase_start("Tactics", "Building engine", 3)
                    fake.monitor_calls += [monitor.step_complete("Tactics", step) for step in range(3)]
                    monitor.phase_finish("Tactics")
                    fake.monitor_calls += [monitor.step_complete("Building engine", step) for step in range(2)]
                    monitor.phase_finish("Building engine")
                return fake.plan

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                fake.parsed = path
                return not fake.parse_errors

            num_errors = property(lambda self: len(fake.parse_errors))

            def get_error(self, index):
                return fake.parse_errors[index]

        class Engine:
            refittable = property(lambda self: fake.refittable)
            device_memory_size_v2 = property(lambda self: fake.device_memory)
            num_io_tensors = property(lambda self: len(fake.io))

            def get_tensor_name(self, index):
                return fake.io[index][0]

            def get_tensor_mode(self, name):
                return next(mode for n, mode, _ in fake.io if n == name)

            def get_tensor_dtype(self, name):
                return next(dtype for n, _, dtype in fake.io if n == name)

            def create_execution_context(self):
                return object()

            def serialize(self):
                return fake.refitted_plan

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data):
                fake.deserialized = data
                return Engine() if fake.engine_loads else None

        class Refitter:
            def __init__(self, engine, logger):
                self.engine = engine

            def get_missing_weights(self):
                return list(fake.missing_weights)

            def get_all_weights(self):
                return list(fake.all_weights)

            def refit_cuda_engine(self):
                fake.refitted = True
                return True

        class OnnxParserRefitter:
            num_errors = 0

            def __init__(self, refitter, logger):
                self.refitter = refitter

            def refit_from_file(self, path):
                fake.refit_onnx = path
                return True

        for cls in (IProgressMonitor, Builder, OnnxParser, Runtime, Refitter, OnnxParserRefitter):
            setattr(trt, cls.__name__, cls)
        return trt


def install(monkeypatch, fake: FakeTensorRT, capability=(8, 9)) -> FakeTensorRT:
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU_NAME)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return fake


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTensorRT:
    return install(monkeypatch, FakeTensorRT())


# ----------------------------------------------------------------------------------------------
# Names and profiles
# ----------------------------------------------------------------------------------------------


def test_engine_file_name_of_an_image_model():
    name = te.engine_file_name(sdxl_manifest(), "10.13.3.9", "89")
    assert name == "sdxl_fp16_b1-1-4_h64-128-128_w64-128-128_trt10.13.3_sm89.engine"


def test_engine_file_name_of_a_video_model_has_static_frames_and_size():
    name = te.engine_file_name(cogvideox_manifest(), "11.4.0.106", "9.0")
    assert name == "cogvideox_fp16_b1-1-2_f13_h60_w90_trt11.4.0_sm90.engine"


def test_engine_file_name_is_filename_safe_and_follows_the_build_profile():
    manifest = sdxl_manifest(dtype="fp16 / test")
    profile = te.optimization_profile_shapes(manifest, {"sample": {"max": [2, 4, 192, 256]}})
    name = te.engine_file_name(manifest, "10.13.3.9+cuda12.9", "8.9", profile=profile)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
    assert name == "sdxl_fp16-test_b1-1-2_h64-128-192_w64-128-256_trt10.13.3_sm89.engine"


def test_profile_shapes_come_from_the_manifest_and_static_inputs_need_none():
    manifest = sdxl_manifest()
    manifest.inputs.append(TensorSpec(name="guidance", dtype="float32", shape=[1, 3]))  # static, no profile
    shapes = te.optimization_profile_shapes(manifest)
    assert shapes["sample"] == ([1, 4, 64, 64], [1, 4, 128, 128], [4, 4, 128, 128])
    assert shapes["timestep"] == ([1], [1], [4])
    assert shapes["guidance"] == ([1, 3], [1, 3], [1, 3])
    assert list(shapes) == manifest.input_names


def test_profile_overrides_replace_only_what_they_give():
    shapes = te.optimization_profile_shapes(sdxl_manifest(), {"sample": {"max": [2, 4, 192, 192]},
                                                              "timestep": {"max": [2]}})
    assert shapes["sample"] == ([1, 4, 64, 64], [1, 4, 128, 128], [2, 4, 192, 192])
    assert shapes["timestep"] == ([1], [1], [2])
    assert shapes["time_ids"] == ([1, 6], [1, 6], [4, 6])


@pytest.mark.parametrize("overrides, message", [
    ({"latents": {"max": [1, 4, 64, 64]}}, r"overrides for \['latents'\]: the exported network has no such input"),
    ({"sample": {"max": [4, 4, 128]}}, r"'sample': max shape \[4, 4, 128\] has 3 axes, the input has 4"),
    ({"sample": {"min": [2, 4, 64, 64]}}, r"'sample', axis 0: needs 1 <= min <= opt <= max, got min 2, opt 1"),
    ({"sample": {"opt": [1, 4, 256, 128]}}, r"axis 2: needs 1 <= min <= opt <= max, got min 64, opt 256, max 128"),
    ({"sample": {"min": [0, 4, 64, 64]}}, r"axis 0: needs 1 <= min"),
    ({"sample": {"min": [1, 8, 64, 64], "opt": [1, 8, 128, 128], "max": [4, 8, 128, 128]}},
     r"axis 1 is static \(4\)"),
    ({"encoder_hidden_states": {"max": [4, 154, 2048]}}, r"'encoder_hidden_states', axis 1 is static \(77\)"),
    ({"sample": {"maximum": [4, 4, 128, 128]}}, r"has keys \['maximum'\]"),
])
def test_profile_overrides_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        te.optimization_profile_shapes(sdxl_manifest(), overrides)


def test_a_dynamic_input_without_profile_is_an_error():
    manifest = sdxl_manifest()
    manifest.inputs[0].profile = {}
    with pytest.raises(ValueError, match=r"'sample' has dynamic axes .* but no min/opt/max profile"):
        te.optimization_profile_shapes(manifest)


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def builds(monkeypatch):
    """The polygraphy build itself needs a GPU: record what it is asked to build, return a plan."""
    calls = []

    def build(trt, onnx_path, shapes, options, timing_cache, progress):
        calls.append({"onnx": onnx_path, "shapes": shapes, "options": options, "timing_cache": timing_cache,
                      "progress": progress})
        return b"serialized engine"

    monkeypatch.setattr(te, "_polygraphy_build", build)
    return calls


def test_build_engine_builds_the_manifest_profile_and_records_the_engine(exported, fake_trt, builds):
    path = te.build_engine(exported, progress=False)

    assert path == exported / "sdxl_fp16_b1-1-4_h64-128-128_w64-128-128_trt10.13.3_sm89.engine"
    assert path.read_bytes() == b"serialized engine"
    (call,) = builds
    assert call["onnx"] == exported / "model.opt.onnx"
    manifest = sdxl_manifest()
    expected = {s.name: (s.profile["min"], s.profile["opt"], s.profile["max"]) for s in manifest.inputs}
    assert call["options"] == {"profiles": [expected], "refittable": True, "builder_optimization_level": 3,
                               "weight_streaming": False}  # no precision flag: strongly typed from the ONNX

    (entry,) = load_manifest(exported).engines
    assert entry["file"] == path.name and entry["size_bytes"] == len(b"serialized engine")
    assert entry["tensorrt"] == "10.13.3.9" and entry["compute_capability"] == "89" and entry["gpu"] == GPU_NAME
    assert entry["refit"] is True and entry["weight_streaming"] is False and entry["optimization_level"] == 3
    assert entry["profile"]["sample"] == {"min": [1, 4, 64, 64], "opt": [1, 4, 128, 128], "max": [4, 4, 128, 128]}
    assert set(entry["profile"]) == set(manifest.input_names)
    assert entry["build_seconds"] >= 0
    assert not list(exported.glob("*.tmp*"))  # written atomically

    te.build_engine(exported, progress=False)  # a rebuild replaces its record
    assert len(load_manifest(exported).engines) == 1


def test_build_engine_options_reach_polygraphy_and_the_name(exported, monkeypatch, builds):
    install(monkeypatch, FakeTensorRT(version="11.4.0.106", strongly_typed_flag=False), capability=(12, 0))
    cache = exported / "timing.cache"
    path = te.build_engine(exported, profile_overrides={"sample": {"max": [2, 4, 128, 128]}}, refit=False,
                           timing_cache=cache, optimization_level=5, workspace_gb=1.5, weight_streaming=True)
    assert path.name == "sdxl_fp16_b1-1-2_h64-128-128_w64-128-128_trt11.4.0_sm120.engine"
    options = builds[0]["options"]
    assert options["refittable"] is False and options["weight_streaming"] is True
    assert options["builder_optimization_level"] == 5 and options["workspace_bytes"] == int(1.5 * 2**30)
    assert options["load_timing_cache"] == str(cache) and builds[0]["timing_cache"] == cache
    assert options["profiles"][0]["sample"][2] == [2, 4, 128, 128] and builds[0]["progress"] is True
    entry = json.loads((exported / "engine.json").read_text())["engines"][0]
    assert entry["refit"] is False and entry["weight_streaming"] is True
    assert entry["profile"]["sample"]["max"] == [2, 4, 128, 128]


def test_the_options_are_polygraphys_own_create_config_arguments():
    """polygraphy's CreateConfig is built (no GPU needed) from the options: a misspelt or dropped
    argument of its API fails here; the profile it holds is the manifest's."""
    from polygraphy.backend.trt import CreateConfig

    shapes = te.optimization_profile_shapes(sdxl_manifest())
    options = te.builder_options(shapes, refit=True, timing_cache=Path("/tmp/cache"), optimization_level=4,
                                 workspace_bytes=2**30, weight_streaming=False)
    config = te.polygraphy_config(options, workspace_pool="WORKSPACE")
    assert isinstance(config, CreateConfig)
    assert config.refittable is True and config.builder_optimization_level == 4
    assert config.memory_pool_limits == {"WORKSPACE": 2**30} and config.timing_cache_path == "/tmp/cache"
    assert not (config.fp16 or config.bf16 or config.tf32)  # strongly typed: precision from the ONNX
    (profile,) = config.profiles
    assert [list(profile["sample"].min), list(profile["sample"].opt), list(profile["sample"].max)] == \
        [[1, 4, 64, 64], [1, 4, 128, 128], [4, 4, 128, 128]]


def test_builder_options_refuse_a_level_tensorrt_does_not_have():
    with pytest.raises(ValueError, match="0-5"):
        te.builder_options({}, refit=True, timing_cache=None, optimization_level=6, workspace_bytes=None,
                           weight_streaming=False)


def test_strongly_typed_only_where_tensorrt_has_the_flag():
    assert te._strongly_typed(FakeTensorRT().module) is True
    assert te._strongly_typed(FakeTensorRT(version="11.4.0.106", strongly_typed_flag=False).module) is None


def test_a_network_whose_inputs_differ_from_the_manifest_is_refused(exported):
    network = types.SimpleNamespace(num_inputs=3, get_input=lambda i: types.SimpleNamespace(
        name=["sample", "timestep", "encoder_hidden_states"][i]))
    with pytest.raises(ValueError, match="come from different exports"):
        te._check_network_inputs(network, te.optimization_profile_shapes(sdxl_manifest()), exported / "model.opt.onnx")


def test_build_engine_without_tensorrt(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(MissingDependency, match=re.escape("pip install .[trt]")):
        te.build_engine(exported, progress=False)


# ----------------------------------------------------------------------------------------------
# Refit
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def engine_file(exported) -> Path:
    path = exported / "sdxl_fp16_b1-1-4_h64-128-128_w64-128-128_trt10.13.3_sm89.engine"
    path.write_bytes(b"serialized engine")
    return path


def test_refit_engine_refits_from_the_onnx_and_rewrites_the_engine(exported, engine_file, fake_trt):
    new_onnx = exported / "lora.onnx"
    new_onnx.write_bytes(b"onnx with other weights")
    assert te.refit_engine(engine_file, new_onnx) == 3
    assert fake_trt.deserialized == b"serialized engine"
    assert fake_trt.refit_onnx == str(new_onnx) and fake_trt.refitted
    assert engine_file.read_bytes() == b"refitted engine"


def test_refit_engine_refuses_an_engine_built_without_refit(exported, engine_file, fake_trt):
    fake_trt.refittable = False
    with pytest.raises(RuntimeError, match="not refittable: it was built without --refit"):
        te.refit_engine(engine_file, exported / "model.opt.onnx")
    assert not fake_trt.refitted and engine_file.read_bytes() == b"serialized engine"


def test_refit_engine_refuses_an_onnx_with_missing_weights(exported, engine_file, fake_trt):
    fake_trt.missing_weights = ["onnx::MatMul_2574"]
    with pytest.raises(RuntimeError, match=r"lacks 1 weight.*onnx::MatMul_2574.*same exporter and opset"):
        te.refit_engine(engine_file, exported / "model.opt.onnx")
    assert not fake_trt.refitted


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------


def _sdxl_feeds(batch=1, size=128):
    return {"sample": torch.zeros(batch, 4, size, size), "timestep": torch.zeros(batch),
            "encoder_hidden_states": torch.zeros(batch, 77, 2048), "text_embeds": torch.zeros(batch, 1280),
            "time_ids": torch.zeros(batch, 6)}


def test_runner_rejects_a_shape_outside_the_profile_before_touching_tensorrt(engine_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    runner = te.TensorRTRunner(engine_file)
    with pytest.raises(ShapeOutsideProfile, match=r"'sample' has shape \[1, 4, 256, 256\].*max \[4, 4, 128, 128\]"):
        runner(**_sdxl_feeds(size=256))
    with pytest.raises(ValueError, match=r"missing \['time_ids'\]"):
        runner(**{k: v for k, v in _sdxl_feeds().items() if k != "time_ids"})
    assert not runner.loaded


def test_runner_checks_against_the_profile_the_engine_was_built_with(exported, engine_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    manifest = load_manifest(exported)
    narrow = {s.name: dict(s.profile) for s in manifest.inputs}
    narrow["sample"]["max"] = [2, 4, 128, 128]
    manifest.engines.append({"file": engine_file.name, "profile": narrow})
    manifest.save(exported)
    with pytest.raises(ShapeOutsideProfile, match=r"max \[2, 4, 128, 128\]"):
        te.TensorRTRunner(engine_file)(**_sdxl_feeds(batch=3))  # within the export's max batch 4


def test_runner_load_failure_names_both_tensorrt_versions_and_gpus(exported, engine_file, fake_trt):
    manifest = load_manifest(exported)
    manifest.engines.append({"file": engine_file.name, "tensorrt": "10.8.0.43", "compute_capability": "86",
                             "gpu": "NVIDIA GeForce RTX 3090"})
    fake_trt.engine_loads = False
    runner = te.TensorRTRunner(engine_file, manifest)
    with pytest.raises(RuntimeError, match=r"built with TensorRT 10\.8\.0\.43 for sm86 \(NVIDIA GeForce RTX 3090\); "
                                           r"this is TensorRT 10\.13\.3\.9 on sm89"):
        runner.load()
    assert not runner.loaded


def test_runner_memory_is_the_engine_file_then_plus_its_device_memory(engine_file, fake_trt):
    runner = te.TensorRTRunner(engine_file)
    size = engine_file.stat().st_size
    assert runner.memory_bytes == size
    runner.load()
    assert runner.loaded and runner.memory_bytes == size + fake_trt.device_memory
    assert runner.dtypes["sample"] == torch.float16 and runner.dtypes["timestep"] == torch.float32
    assert runner.engine_inputs == sdxl_manifest().input_names and runner.output_name == "latent"
    runner.unload()
    assert not runner.loaded and runner.memory_bytes == size


def test_runner_rejects_an_engine_from_another_export(engine_file, fake_trt):
    fake_trt.io = [("x", "INPUT", "float16"), ("h", "OUTPUT", "float16")]
    with pytest.raises(ValueError, match="different exports"):
        te.TensorRTRunner(engine_file).load()


def test_runner_only_runs_on_cuda_devices(engine_file):
    with pytest.raises(ValueError, match="CUDA devices"):
        te.TensorRTRunner(engine_file, device="cpu")


# ----------------------------------------------------------------------------------------------
# Real TensorRT (GPU only)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        pytest.skip("tensorrt is not installed (pip install .[trt] on a machine with an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: TensorRT engines are built and run on an NVIDIA GPU")
    try:
        trt.Builder(trt.Logger(trt.Logger.WARNING))
    except (TypeError, RuntimeError) as error:
        pytest.skip(f"TensorRT cannot create a builder on this machine ({error})")
    return trt


def _export_conv(model: torch.nn.Module, folder: Path) -> EngineManifest:
    """A tiny fp32 conv exported like a student: engine.json plus the ONNX it names."""
    manifest = EngineManifest(
        family="sdxl", signature="diffusers", prediction_type="epsilon", scheduler_config={},
        timesteps=[899, 674, 449, 224], dtype="fp32",
        inputs=[_spec("sample", "float32", [-1, 4, -1, -1], [1, 4, 8, 8], [1, 4, 16, 16], [2, 4, 32, 32])],
        outputs=[TensorSpec(name="out", dtype="float32", shape=[-1, 4, -1, -1])],
    )
    folder.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (torch.zeros(1, 4, 16, 16),), str(folder / manifest.onnx), input_names=["sample"],
                      output_names=["out"], dynamic_axes={"sample": axes, "out": axes}, opset_version=17,
                      dynamo=False)
    manifest.save(folder)
    return manifest


def _conv(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(4, 4, 3, padding=1).eval()


def test_real_engine_matches_torch_and_refits(real_tensorrt, tmp_path):
    first, second = _conv(0), _conv(1)
    _export_conv(first, tmp_path / "first")
    _export_conv(second, tmp_path / "second")
    engine_path = te.build_engine(tmp_path / "first", progress=False)
    assert engine_path.stat().st_size > 0 and load_manifest(tmp_path / "first").engines[0]["file"] == engine_path.name

    x = torch.randn(2, 4, 24, 8)  # not the opt shape; on the CPU: the runner moves it and brings it back
    runner = te.TensorRTRunner(engine_path)
    with torch.no_grad():
        out = runner(sample=x)
        assert out.device == x.device and out.dtype == torch.float32
        torch.testing.assert_close(out, first(x), rtol=1e-2, atol=1e-2)  # TF32 convolutions
        assert runner.memory_bytes > engine_path.stat().st_size
        runner.unload()

        assert te.refit_engine(engine_path, tmp_path / "second" / "model.opt.onnx") >= 2
        refitted = te.TensorRTRunner(engine_path)(sample=x.cuda())
        assert refitted.is_cuda
        torch.testing.assert_close(refitted.cpu(), second(x), rtol=1e-2, atol=1e-2)
