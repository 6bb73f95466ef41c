"""Test double of ComfyUI 0.3.64's ``comfy.model_sampling`` (commit a125cd84): the classes the
nodes use in isinstance checks (flow models' CONST, discrete-time ModelSamplingDiscrete)."""


class CONST:
    """Flow-matching model_sampling mixin (here: a marker class only)."""


class ModelSamplingDiscrete:
    """Discrete-time model_sampling; the real one holds ``sigmas`` for t = 0..999."""
