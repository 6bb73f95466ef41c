"""Test double of ComfyUI 0.3.64's ``comfy.model_sampling`` (commit a125cd84): only the CONST
class (flow models' model_sampling), which the nodes use in isinstance checks."""


class CONST:
    """Flow-matching model_sampling mixin (here: a marker class only)."""
