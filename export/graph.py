"""ONNX files on disk: one weight sidecar, constant folding and clean-up before a TensorRT build.

The TorchScript exporter writes one external file per tensor for models over 2 GB (protobuf's
limit); we always rewrite into ``<name>.onnx`` + one ``<name>.onnx.data`` when external data is
used, and load/check by PATH so files over 2 GB work."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tdm_train.errors import IncompatibleFile

from .deps import require

TWO_GB = 2**31 - 1


def needs_external_data(model, mode: str) -> bool:
    """``mode`` auto: over 2 GB, or always on Windows (ByteSize wraps around there, as NVIDIA notes)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return sys.platform == "win32" or model.ByteSize() > TWO_GB


def save_model(model, path: Path, external: bool) -> None:
    """Writes ``path`` (and ``path.data``) through temporary names, then renames: a reader never
    sees a half-written pair."""
    onnx = require("onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        data_name = path.name + ".data"
        if external:
            onnx.save_model(model, str(staging / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024, convert_attribute=False)
            os.replace(staging / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(staging / path.name))
            if (path.parent / data_name).exists():
                (path.parent / data_name).unlink()
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def consolidate(raw_path: Path, path: Path, external_data: str) -> bool:
    """Loads what the exporter wrote (with any per-tensor files) and saves it as one pair."""
    onnx = require("onnx")
    model = onnx.load(str(raw_path))
    external = needs_external_data(model, external_data)
    save_model(model, path, external)
    return external


def optimize(src: Path, dst: Path, external: bool) -> dict:
    """Constant folding (polygraphy), clean-up and topological sort (onnx-graphsurgeon), shape
    inference (by path when over 2 GB). Returns node counts before and after."""
    onnx = require("onnx")
    gs = require("onnx_graphsurgeon")
    fold = require("polygraphy.backend.onnx").fold_constants
    _quiet_folding()
    model = onnx.load(str(src))
    before = len(model.graph.node)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = fold(gs.export_onnx(graph), allow_onnxruntime_shape_inference=True, error_ok=False)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    if model.ByteSize() < TWO_GB:
        model = onnx.shape_inference.infer_shapes(model)
        save_model(model, dst, external)
    else:
        save_model(model, dst, True)
        onnx.shape_inference.infer_shapes_path(str(dst), str(dst))
    onnx.checker.check_model(str(dst))
    return {"nodes_exported": before, "nodes_optimized": len(model.graph.node)}


def _quiet_folding() -> None:
    """polygraphy reports every folding pass and ONNX Runtime (its shape inference) every optimizer
    note; keep warnings and errors only."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    require("onnxruntime").set_default_logger_severity(3)


def onnx_summary(path: Path) -> dict:
    """Opset, I/O names and node count, without loading the weights."""
    onnx = require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError):
        raise
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError
        raise IncompatibleFile(f"{path} is not an ONNX model ({type(error).__name__}: {error})") from None
    return {"opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "nodes": len(model.graph.node)}
