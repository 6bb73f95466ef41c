"""Test double of ComfyUI 0.3.64's ``comfy_api.latest`` (commit a125cd84): io, ui and
ComfyExtension, as the V3 nodes and the pack's entry point use them."""

from abc import ABC, abstractmethod

from . import _io as io
from . import _ui as ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The nodes that this extension provides."""


comfy_io = io

__all__ = ["ComfyExtension", "io", "comfy_io", "ui"]
