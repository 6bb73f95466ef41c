"""The ComfyUI V3 API the nodes import: ``io``, ``ui`` and ``ComfyExtension``.

``comfy_api.latest`` is ComfyUI's in-development API, which its maintainers say changes without
warning; custom nodes are advised to import a numbered version. The oldest numbered version that
provides all three names is taken (``comfy_api.v0_0_2`` in ComfyUI 0.3.64, which re-exports them),
then a newer numbered one, and only then ``latest``, with a warning naming what was missing. The
module the nodes got is ``SOURCE``; ComfyUI's log says it once at start-up."""

from __future__ import annotations

import importlib
import logging

NUMBERED = ("comfy_api.v0_0_2", "comfy_api.v0_0_3")
FALLBACK = "comfy_api.latest"
NAMES = ("io", "ui", "ComfyExtension")


def resolve(candidates=NUMBERED + (FALLBACK,)):
    """(module, its name): the first candidate that imports and has every name of NAMES."""
    problems = []
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            problems.append(f"{name}: {error}")
            continue
        missing = [attr for attr in NAMES if not hasattr(module, attr)]
        if missing:
            problems.append(f"{name} lacks {', '.join(missing)}")
            continue
        if name == FALLBACK:
            logging.warning("ComfyUI-TDM: no numbered comfy_api version provides %s (%s); using the "
                            "in-development %s", ", ".join(NAMES), "; ".join(problems), FALLBACK)
        return module, name
    raise ImportError("ComfyUI-TDM's nodes need ComfyUI's V3 API (ComfyUI >= 0.3.48, run from ComfyUI/custom_nodes/): "
                      + "; ".join(problems))


_module, SOURCE = resolve()
io, ui, ComfyExtension = _module.io, _module.ui, _module.ComfyExtension
logging.info("ComfyUI-TDM: V3 API from %s", SOURCE)
