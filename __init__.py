"""ComfyUI-TDM: the node pack's entry point (ComfyUI V3 schema).

ComfyUI imports this file as a package from custom_nodes/; importing it anywhere else must not
fail, so nothing heavy and nothing from ComfyUI is imported at module level. `tdm_train` and
`export` are imported absolutely by the nodes, so the pack root goes on sys.path (appended, so
ComfyUI's own top-level `nodes` module keeps precedence over our `nodes/` folder).
"""

import os
import sys

PACK_ROOT = os.path.dirname(os.path.abspath(__file__))
if PACK_ROOT not in sys.path:
    sys.path.append(PACK_ROOT)


async def comfy_entrypoint():
    """Called by ComfyUI (>= 0.3.48) to get the pack's extension and its node list."""
    from .nodes import build_extension

    return build_extension()
