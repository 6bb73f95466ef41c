"""ComfyUI nodes: thin adapters over tdm_train and export, and the only code that imports comfy.

Imported relatively from the pack root (ComfyUI owns a top-level module called `nodes`).
"""

from __future__ import annotations


def node_classes() -> list[type]:
    """Every node the extension registers (imported here, inside ComfyUI only)."""
    from . import cogvideox, engines, lora, sampling, training

    return [*sampling.NODES, *lora.NODES, *engines.NODES, *training.NODES, *cogvideox.NODES]


def build_extension():
    """The ComfyExtension that ComfyUI's V3 loader asks for (see the root __init__.py)."""
    from .v3_api import ComfyExtension  # a numbered comfy_api version (v3_api.py); ImportError outside ComfyUI

    class TDMExtension(ComfyExtension):
        async def get_node_list(self):
            return node_classes()

    return TDMExtension()
