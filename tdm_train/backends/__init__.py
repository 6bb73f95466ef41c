"""Backbones seen through the x0-predictor protocol: each backend turns its network's raw output
into x0 on the schedule of the model's own scheduler config, and knows its conditioning."""

from .base import Backend, RoleFunction
from .cogvideox import CogVideoXBackend
from .digits import DigitsBackend
from .pixart import PixArtBackend
from .sd3 import SD3Backend
from .sdxl import SDXLBackend

__all__ = ["Backend", "CogVideoXBackend", "DigitsBackend", "PixArtBackend", "RoleFunction", "SD3Backend", "SDXLBackend"]
