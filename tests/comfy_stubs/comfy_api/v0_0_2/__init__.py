"""Test double of ComfyUI 0.3.64's ``comfy_api.v0_0_2`` (commit a125cd84): the numbered version
re-exports io, ui and ComfyExtension of ``comfy_api.latest``."""

from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

__all__ = ["ComfyExtension", "io", "ui"]
