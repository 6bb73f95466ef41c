"""Imports the pack the way ComfyUI's load_custom_node does (a package named after its path), for
the check scripts that run inside ComfyUI's Python. Importing it puts the pack root on sys.path,
so ``export`` and ``tdm_train`` import too."""

import importlib
import importlib.util
import sys
from pathlib import Path


def load_pack(pack_root: Path, submodule: str):
    name = str(pack_root).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pack_root / "__init__.py",
                                                      submodule_search_locations=[str(pack_root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.{submodule}")
