"""The timesteps a TDM student is trained on, and so must be sampled on.

A student trained on 899/674/449/224 and sampled on a stock grid (999/749/499/249) is run off
its training trajectory; every grid here is a plain descending list of integer timesteps.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

# The official CogVideoX-2B TDM LoRA was trained on this grid (a shift-2 warp of the uniform one).
COGVIDEOX_TIMESTEPS = (999, 856, 665, 399)


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> list[int]:
    """Check an explicit grid: non-empty, integers, strictly decreasing, inside [0, T - 1]."""
    grid = list(timesteps)
    if not grid:
        raise ValueError("a timestep grid needs at least one timestep")
    checked = []
    for t in grid:
        if hasattr(t, "item"):  # numpy / torch scalars
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not float(t).is_integer():
            raise ValueError(f"timesteps must be integers, got {t!r} in {grid}")
        checked.append(int(t))
    for t in checked:
        if not 0 <= t < num_train_timesteps:
            raise ValueError(f"timestep {t} is outside [0, {num_train_timesteps - 1}] in {checked}")
    for earlier, later in zip(checked, checked[1:]):
        if later >= earlier:
            raise ValueError(f"timesteps must be strictly decreasing (noisiest first), got {checked}")
    return checked


def tdm_timesteps(
    num_steps: int = 4,
    total_steps: int = 900,
    timesteps: Sequence[int] | None = None,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """The TDM demo grid t_k = k * total_steps // num_steps - 1, noisiest first.

    ``tdm_timesteps()`` is ``[899, 674, 449, 224]``. An explicit ``timesteps`` list is validated
    and returned instead (e.g. ``COGVIDEOX_TIMESTEPS``).
    """
    if timesteps is not None:
        return validate_timesteps(timesteps, num_train_timesteps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not num_steps <= total_steps <= num_train_timesteps:
        raise ValueError(
            f"total_steps must lie in [num_steps, num_train_timesteps] = [{num_steps}, {num_train_timesteps}], "
            f"got {total_steps}"
        )
    grid = [k * total_steps // num_steps - 1 for k in range(num_steps, 0, -1)]
    return validate_timesteps(grid, num_train_timesteps)


def shifted_timesteps(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> list[int]:
    """The uniform grid u = k / K warped by the SD3 time shift, as integer timesteps:
    t_k = floor(T * shift * u / (1 + (shift - 1) * u)) - 1.

    ``shifted_timesteps(4, 2.0)`` is the CogVideoX training grid ``[999, 856, 665, 399]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    grid = []
    for k in range(num_steps, 0, -1):
        u = k / num_steps
        # round away float noise before the floor (0.5 * 1000 must give 500, not 499.99...)
        warped = round(num_train_timesteps * shift * u / (1 + (shift - 1) * u), 9)
        grid.append(int(warped) - 1)
    return validate_timesteps(grid, num_train_timesteps)
