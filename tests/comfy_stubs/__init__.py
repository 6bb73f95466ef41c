"""Test doubles of the parts of ComfyUI 0.3.64 (commit a125cd84) that the pack's nodes import.

The files under this folder are plain modules named after the ComfyUI modules they stand in for
(``comfy_api/latest/_io.py`` is ``comfy_api.latest._io``, ...). They are not importable under
those names by themselves: ``install(monkeypatch)`` loads each one from its file and puts it in
``sys.modules`` with ``monkeypatch.setitem``, so it is gone again after the test. The constructor
signatures of ``comfy_api.latest.io`` are ComfyUI 0.3.64's, keyword for keyword, so a node that
passes an argument ComfyUI does not have fails here with the TypeError it would raise in ComfyUI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (module name, file under HERE), in the order they are executed: a module runs after the stubs it
# imports from (comfy_api.latest imports _io and _ui; _ui imports _io).
MODULES = [
    ("comfy_api", "comfy_api/__init__.py"),
    ("comfy_api.latest._io", "comfy_api/latest/_io.py"),
    ("comfy_api.latest._ui", "comfy_api/latest/_ui.py"),
    ("comfy_api.latest", "comfy_api/latest/__init__.py"),
    ("comfy_api.v0_0_2", "comfy_api/v0_0_2/__init__.py"),
    ("comfy", "comfy/__init__.py"),
    ("comfy.k_diffusion", "comfy/k_diffusion/__init__.py"),
    ("comfy.k_diffusion.sampling", "comfy/k_diffusion/sampling.py"),
    ("comfy.lora", "comfy/lora.py"),
    ("comfy.lora_convert", "comfy/lora_convert.py"),
    ("comfy.model_management", "comfy/model_management.py"),
    ("comfy.model_sampling", "comfy/model_sampling.py"),
    ("comfy.patcher_extension", "comfy/patcher_extension.py"),
    ("comfy.sample", "comfy/sample.py"),
    ("comfy.samplers", "comfy/samplers.py"),
    ("comfy.utils", "comfy/utils.py"),
    ("folder_paths", "folder_paths.py"),
    ("latent_preview", "latent_preview.py"),
]


def install(monkeypatch) -> dict:
    """Puts every stub into sys.modules (undone by monkeypatch at teardown); returns them by name."""
    modules = {}
    for name, relative in MODULES:
        path = HERE / relative
        locations = [str(path.parent)] if path.name == "__init__.py" else None
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
        modules[name] = importlib.util.module_from_spec(spec)
    # all names first, so that imports between stubs resolve to stubs and never search sys.path
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)  # `import comfy.samplers` then `comfy.samplers.X`
    for name, module in modules.items():
        module.__spec__.loader.exec_module(module)
    return modules
