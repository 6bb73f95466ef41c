"""Export a student to ONNX, fold it, check it on ONNX Runtime against PyTorch, and describe it
in ``engine.json``.

The TorchScript-based exporter is the default (``dynamo=False``, always passed explicitly: torch
2.9 flipped the default, which broke ComfyUI_TensorRT). The dynamo exporter is an option; on
torch 2.13 it produced graphs that ONNX Runtime refuses for PixArt and fp16 SDXL-style UNets,
which the validation step reports.
"""

from __future__ import annotations

import platform
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import graph
from .families import DTYPES, ExportShapes, FamilySpec
from .manifest import EngineManifest
from tdm_train.errors import IncompatibleFile
from tdm_train.schedule import NoiseSchedule

from .deps import MissingDependency
from .runtime import OnnxRuntimeRunner, resolve_provider
from .validate import TOLERANCES, Tolerance, ValidationFailed, compare

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # dynamo builds at 18; converting down leaves invalid Splits


class ExportFailed(IncompatibleFile):
    """torch.onnx could not export the model; the message names the exporter and what to try."""


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "onnx-graphsurgeon",
                    "tensorrt", "tdm-few-step"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _torch_export(spec: FamilySpec, inputs: dict[str, torch.Tensor], path: Path, opset: int, exporter: str) -> None:
    try:
        _run_exporter(spec, inputs, path, opset, exporter)
    except Exception as error:  # the exporters raise many types; the user needs the exporter and a way out
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch colours its messages
        first_line = text.splitlines()[0] if text else type(error).__name__
        hint = (" The default --exporter torchscript exports every supported family." if exporter == "dynamo"
                else "")
        raise ExportFailed(f"torch.onnx ({exporter}, opset {opset}) could not export the {spec.family} model: "
                           f"{type(error).__name__}: {first_line}.{hint}") from error


def _run_exporter(spec: FamilySpec, inputs: dict[str, torch.Tensor], path: Path, opset: int, exporter: str) -> None:
    args = tuple(inputs[name] for name in spec.input_names)
    common = dict(input_names=spec.input_names, output_names=[o.name for o in spec.output_specs],
                  opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if exporter == "torchscript":
            torch.onnx.export(spec.module, args, str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes=spec.dynamic_axes, **common)
        elif exporter == "dynamo":
            program = torch.onnx.export(spec.module, args, dynamo=True, dynamic_shapes=_dynamic_shapes(spec),
                                        external_data=True, **common)
            program.save(str(path), external_data=True)
        else:
            raise ValueError(f"exporter {exporter!r}: expected one of {EXPORTERS}")


def _dynamic_shapes(spec: FamilySpec) -> tuple:
    """dynamic_axes as torch.export dims, one shared Dim per axis name (so every input's batch is
    the same symbol)."""
    from torch.export import Dim

    dims = {}
    for spec_input in spec.input_specs:
        for axis, name in spec.dynamic_axes.get(spec_input.name, {}).items():
            low, high = spec_input.profile["min"][axis], spec_input.profile["max"][axis]
            dims.setdefault(name, Dim(name, min=low, max=high))
    return tuple({axis: dims[name] for axis, name in spec.dynamic_axes.get(s.name, {}).items()} or None
                 for s in spec.input_specs)


def _record_failure(manifest: EngineManifest, out_dir: Path, reason: str) -> None:
    manifest.validation = {"runtime": "onnxruntime", "passed": False, "error": reason}
    manifest.save(out_dir)


def validation_plan(shapes: ExportShapes, provider: str) -> tuple[list[dict[str, int]], str]:
    """(the shapes to validate at, the plan in words)."""
    if provider == "cuda":
        return shapes.points(), "CUDA: the opt, min and max corners of the profile"
    return shapes.bounded_points(), ("CPU, bounded: the opt shape, the smallest size at the largest batch, the "
                                     "largest size at batch 1")


def _describe(point: dict[str, int]) -> str:
    return f"batch {point['batch']}, {point['height']}x{point['width']} latent, {point['text_len']} tokens"


class Phases:
    """One progress line per phase: what starts, then its seconds (and a note) when it ends."""

    def __init__(self, log):
        self.log, self.since = log, 0.0

    def start(self, what: str) -> None:
        self.since = time.perf_counter()
        self.log(f"{what} ...")

    def done(self, note: str = "") -> None:
        seconds = time.perf_counter() - self.since
        self.log(f"  {seconds:.1f} s" + (f": {note}" if note else ""))


def _on(parameter: torch.Tensor, case: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """Inputs on the module's device in its dtype (timesteps stay float32)."""
    return [case[n].to(parameter.device, torch.float32 if n == "timestep" else parameter.dtype) for n in names]


def export_onnx(spec: FamilySpec, out_dir: str | Path, *, dtype: str, shapes: ExportShapes, scheduler_config: dict,
                timesteps: list[int], signature: str = "diffusers", source: dict | None = None,
                opset: int | None = None, exporter: str = "torchscript", external_data: str = "auto",
                tolerance: Tolerance | None = None, threads: int | None = None, num_steps: int | None = None,
                unify_steps: list[int] | None = None, provider: str = "auto", log=None) -> EngineManifest:
    """Writes ``model.onnx`` (+ ``.data``), ``model.opt.onnx`` and ``engine.json`` into ``out_dir``.
    The reference outputs are taken from the module as it comes (float32 from the CLI; a ComfyUI
    model in its own dtype and device) before it is cast to ``dtype``. Raises :class:`ValidationFailed` (after writing the manifest with the figures)
    when ONNX Runtime is out of tolerance.

    Validation runs on ``provider`` ("auto": CUDA when onnxruntime-gpu has a device there, else the
    CPU). On CUDA it covers every corner of the profile; on the CPU it follows
    :meth:`ExportShapes.bounded_points` (its cost bounded at about two opt-shape calls), and says so
    in the output and in ``engine.json``. ``log(message)`` gets one line per phase with its time."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r}: expected one of {EXPORTERS}")
    opset = opset or DEFAULT_OPSET[exporter]
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"opset {opset} with the dynamo exporter: it builds at opset 18, and converting down "
                         "leaves operators ONNX Runtime refuses; use --opset 18 or later (or --exporter torchscript)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tolerance = tolerance or TOLERANCES[dtype]
    started = time.perf_counter()
    log = log or (lambda message: None)
    provider = resolve_provider(provider)
    points, plan = validation_plan(shapes, provider)

    # reference outputs of the model as it comes, at every validation shape
    phase = Phases(log)
    phase.start(f"PyTorch reference outputs at {len(points)} shape(s) ({plan})")
    generator = torch.Generator().manual_seed(0)
    cases = [spec.example_inputs(point, generator) for point in points]
    parameter = next(spec.module.parameters())
    with torch.no_grad():
        references = [spec.module(*_on(parameter, case, spec.input_names)).float().cpu() for case in cases]
    phase.done()

    spec.module.to(DTYPES[dtype])
    # torch.export specialises a batch of 1 (expand/broadcast guards); trace dynamo at batch 2 when allowed
    export_case = cases[0]
    if exporter == "dynamo" and shapes.batch[0] != shapes.batch[2] and shapes.batch[1] == 1:
        export_case = spec.example_inputs({**points[0], "batch": min(2, shapes.batch[2])}, generator)
    export_inputs = dict(zip(spec.input_names, _on(next(spec.module.parameters()), export_case, spec.input_names)))
    staging = out_dir / ".export-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        phase.start(f"tracing the {spec.family} network ({exporter}, opset {opset}, {dtype})")
        _torch_export(spec, export_inputs, staging / "model.onnx", opset, exporter)
        phase.done()
        phase.start("saving model.onnx")
        external = graph.consolidate(staging / "model.onnx", out_dir / "model.onnx", external_data)
        phase.done("with external data" if external else "")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    export_seconds = time.perf_counter() - started
    phase.start("folding constants and cleaning up the graph (polygraphy, onnx-graphsurgeon) -> model.opt.onnx")
    counts = graph.optimize(out_dir / "model.onnx", out_dir / "model.opt.onnx", external)
    phase.done(f"{counts.get('nodes_optimized', '?')} nodes")

    # as the runtime reads the schedule (a FlowMatch* config states no prediction_type: flow_prediction)
    prediction_type = NoiseSchedule.from_diffusers_config(scheduler_config).prediction_type
    manifest = EngineManifest(
        family=spec.family, signature=signature, prediction_type=prediction_type, scheduler_config=scheduler_config,
        timesteps=list(timesteps), dtype=dtype, inputs=spec.input_specs, outputs=spec.output_specs,
        latent=spec.latent, conditioning=spec.conditioning,
        export={"exporter": exporter, "opset": opset, "external_data": external, "seconds": round(export_seconds, 2),
                "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
                **counts},
        source=source or {}, versions=versions(),
        num_steps=None if num_steps is None else int(num_steps),
        unify_steps=None if unify_steps is None else [int(k) for k in unify_steps],
    )
    manifest.save(out_dir)  # before validation, so a failing export can still be inspected

    try:
        runner = OnnxRuntimeRunner(out_dir / manifest.onnx, manifest, provider=provider, threads=threads)
    except (MissingDependency, FileNotFoundError):
        raise
    except Exception as error:  # onnxruntime's own exception types
        _record_failure(manifest, out_dir, f"ONNX Runtime cannot load it: {error}")
        raise ValidationFailed(f"{out_dir}: ONNX Runtime cannot load the {exporter} export: {error}") from error
    results, problems = [], []
    for index, (point, case, reference) in enumerate(zip(points, cases, references), 1):
        phase.start(f"validating on ONNX Runtime ({provider.upper()}) at {_describe(point)} ({index} of {len(points)})")
        try:
            output = runner(**case)
        except Exception as error:
            _record_failure(manifest, out_dir, f"ONNX Runtime fails at {point}: {error}")
            raise ValidationFailed(f"{out_dir}: ONNX Runtime fails at {point} (the {exporter} export baked in a "
                                   f"shape?): {error}") from error
        stats = compare(reference, output)
        failures = stats.failures(tolerance)
        phase.done(f"cosine {stats.cosine:.6f}, max |err| {stats.max_abs:.3g}: {'ok' if not failures else 'OUT OF TOLERANCE'}")
        results.append({"shape": point, **stats.as_dict(), "passed": not failures})
        problems += [f"at {point}: {f}" for f in failures]
    manifest.validation = {"runtime": f"onnxruntime-{provider}", "reference": "pytorch-float32", "plan": plan,
                           "tolerance": {k: v for k, v in vars(tolerance).items()}, "cases": results,
                           "passed": not problems}
    manifest.save(out_dir)
    if problems:
        raise ValidationFailed(f"{out_dir}: ONNX Runtime ({dtype}) vs PyTorch is out of tolerance: "
                               + "; ".join(problems))
    return manifest
