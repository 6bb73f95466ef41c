"""Sampling-grid presets for TDM students, independent of any UI.

A grid is either integer timesteps (VP models, and the model's own table turns them into
sigmas) or, for rectified-flow LoRAs such as the official TDM SD3 one, flow sigmas directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .timesteps import COGVIDEOX_TIMESTEPS, tdm_timesteps, validate_timesteps

PRESETS = ("tdm_uniform", "cogvideox", "flow_shifted", "custom", "recorded")
# where the ComfyUI nodes keep the grid a loaded TDM LoRA was trained on (its tdm.timesteps), on the MODEL
RECORDED_GRID_OPTION = "tdm_recorded_timesteps"


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The flow sigmas of diffusers' DPMSolverMultistep with ``use_flow_sigmas`` and
    ``flow_shift``, the scheduler of the official TDM SD3 recipe: u = 1 - linspace(1, 1/T, K+1)
    reversed and cut to K values, then sigma = shift u / (1 + (shift - 1) u).
    ``flow_sigmas(4, 6.0)`` is about [0.9998, 0.9472, 0.8569, 0.6664]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    span = 1 - 1 / num_train_timesteps
    unshifted = [span * k / num_steps for k in range(num_steps, 0, -1)]  # noisiest first
    return [shift * u / (1 + (shift - 1) * u) for u in unshifted]


@dataclass(frozen=True)
class SamplingGrid:
    """Integer ``timesteps`` (the model's table gives the sigmas) or flow ``sigmas``; never both."""

    timesteps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self):
        if (self.timesteps is None) == (self.sigmas is None):
            raise ValueError("a sampling grid has either timesteps or flow sigmas")

    def __len__(self) -> int:
        return len(self.timesteps if self.timesteps is not None else self.sigmas)


def parse_timestep_list(text: str, num_train_timesteps: int = 1000) -> list[int]:
    """'999, 856, 665, 399' -> [999, 856, 665, 399], validated."""
    items = [item.strip() for item in text.replace(";", ",").split(",") if item.strip()]
    if not items:
        raise ValueError("custom timesteps are empty: give a comma list such as '899, 674, 449, 224'")
    values = []
    for item in items:
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"custom timesteps must be integers, got {item!r} in {text!r}") from None
    return validate_timesteps(values, num_train_timesteps)


def sampling_grid(
    preset: str = "tdm_uniform",
    steps: int = 4,
    total_steps: int = 900,
    shift: float = 6.0,
    custom: str = "",
    denoise: float = 1.0,
    num_train_timesteps: int = 1000,
    recorded: tuple[int, ...] | list[int] | None = None,
) -> SamplingGrid:
    """The grid a preset describes, cut for img2img: with ``denoise`` < 1 only the trained
    points at or below that noise level are kept ((t + 1) / T <= denoise for timesteps,
    sigma <= denoise for flow sigmas), so the student still only sees timesteps it was trained on.
    ``recorded``: the grid of the TDM LoRA the model carries (preset "recorded")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must lie in (0, 1], got {denoise}")
    if preset == "flow_shifted":
        sigmas = [s for s in flow_sigmas(steps, shift, num_train_timesteps) if s <= denoise + 1e-9]
        if not sigmas:
            raise ValueError(f"denoise {denoise} is below every sigma of the {steps}-step flow grid")
        return SamplingGrid(sigmas=tuple(sigmas))
    if preset == "tdm_uniform":
        grid = tdm_timesteps(steps, total_steps, num_train_timesteps=num_train_timesteps)
    elif preset == "cogvideox":
        grid = list(COGVIDEOX_TIMESTEPS)
    elif preset == "recorded":
        if not recorded:
            raise ValueError("preset 'recorded': this MODEL carries no TDM LoRA grid (load the LoRA with the TDM LoRA "
                             "Loader, or use TDM Train LoRA's model output), or the LoRA records none: pick "
                             "tdm_uniform / custom")
        grid = validate_timesteps(list(recorded), num_train_timesteps)
    else:
        grid = parse_timestep_list(custom, num_train_timesteps)
    kept = [t for t in grid if (t + 1) / num_train_timesteps <= denoise + 1e-9]
    if not kept:
        raise ValueError(f"denoise {denoise} is below every trained timestep of {grid}; raise denoise")
    return SamplingGrid(timesteps=tuple(kept))
