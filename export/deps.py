"""Optional dependencies of the export tool, imported only when a command needs them, so that
``python -m export.trt --help``, the ComfyUI pack and the ONNX-only paths work without TensorRT."""

from __future__ import annotations

import importlib

ONNX_EXTRA = "pip install onnx onnxruntime onnx-graphsurgeon polygraphy  (or: pip install .[onnx])"
OPENVINO_EXTRA = "pip install openvino  (or: pip install .[openvino])"
TRT_EXTRA = "pip install .[trt]  (TensorRT 10 or 11 for your CUDA version, e.g. tensorrt-cu12, plus onnxruntime-gpu)"


from tdm_train.errors import MissingDependency  # noqa: F401  (exit code 5; re-exported: export.deps.MissingDependency)


def require(module: str, install: str = ONNX_EXTRA):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependency(f"{module} is not installed ({error}); {install}") from None


def require_tensorrt():
    """tensorrt, after checking that it can reach a CUDA device (the PyPI wheels install without
    one, then fail at the first Builder/Runtime)."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise MissingDependency(
            f"TensorRT is not installed ({error}). TensorRT engines are built and run on an NVIDIA GPU: "
            f"{TRT_EXTRA}. The ONNX export, validation and ONNX Runtime paths work without it.") from None
    import torch

    if not torch.cuda.is_available():
        raise MissingDependency(
            f"TensorRT {trt.__version__} is installed but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). An engine is built for, "
            "and runs on, the GPU it is built on: run this on a machine with an NVIDIA GPU and a CUDA build of torch.")
    return trt


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__
