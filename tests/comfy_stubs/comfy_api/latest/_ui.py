"""Test double of ComfyUI 0.3.64's ``comfy_api.latest._ui`` (commit a125cd84): PreviewText only."""

from ._io import _UIOutput


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs):  # ComfyUI 0.3.64 accepts (and ignores) any keyword
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}
