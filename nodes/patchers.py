"""ComfyUI's model patchers across versions. ComfyUI 0.38 turns "dynamic VRAM" on by default on
NVIDIA with torch >= 2.8: loaders return a ``ModelPatcherDynamic`` (``is_dynamic()`` True) that
streams weights instead of holding patched ones, and refuses ``load_models_gpu(...,
force_patch_weights=True)``. The export (merged weights traced into ONNX) and the trainer (weight
wrappers on every targeted layer) need a classic patcher: the non-dynamic clone core's own LoRA
trainer uses, ``clone(disable_dynamic=True)``. ComfyUI 0.3.64 has none of these names; its
patchers are classic already."""

from __future__ import annotations

import contextlib


def is_dynamic(model) -> bool:
    check = getattr(model, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def classic_patcher(model, node: str):
    """``model`` itself when it holds its weights (every patcher of ComfyUI < 0.38), else its
    non-dynamic clone; ``node`` names the caller in the error when ComfyUI cannot make one."""
    if not is_dynamic(model):
        return model
    try:
        return model.clone(disable_dynamic=True)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{node}: this MODEL is ComfyUI's dynamic-VRAM patcher and no classic copy of it can be made "
                         f"({error}); restart ComfyUI with --disable-dynamic-vram") from None


@contextlib.contextmanager
def training_mode():
    """``comfy.model_management.in_training`` set while training (ComfyUI 0.38 reads it; older
    versions have no such flag and nothing is set)."""
    import comfy.model_management

    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before, comfy.model_management.in_training = comfy.model_management.in_training, True
    try:
        yield
    finally:
        comfy.model_management.in_training = before
