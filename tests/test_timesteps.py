"""Timestep grids: the published ones, and clear errors for bad explicit lists."""

import pytest

from tdm_train import COGVIDEOX_TIMESTEPS, shifted_timesteps, tdm_timesteps, validate_timesteps


def test_demo_grid():
    assert tdm_timesteps() == [899, 674, 449, 224]
    assert tdm_timesteps(4, 900) == [899, 674, 449, 224]


def test_other_uniform_grids_floor_when_k_does_not_divide():
    assert tdm_timesteps(1, 900) == [899]
    assert tdm_timesteps(2, 1000) == [999, 499]
    assert tdm_timesteps(8, 900) == [899, 786, 674, 561, 449, 336, 224, 111]
    assert tdm_timesteps(3, 1000) == [999, 665, 332]  # k * 1000 // 3 - 1


def test_cogvideox_grid_as_a_list_and_as_the_shift_2_warp():
    assert tdm_timesteps(timesteps=[999, 856, 665, 399]) == [999, 856, 665, 399]
    assert list(COGVIDEOX_TIMESTEPS) == [999, 856, 665, 399]
    assert shifted_timesteps(4, 2.0) == [999, 856, 665, 399]
    assert shifted_timesteps(4, 1.0) == [999, 749, 499, 249]


@pytest.mark.parametrize(
    "grid, message",
    [
        ([], "at least one"),
        ([899, 899, 449], "strictly decreasing"),
        ([224, 449, 674, 899], "strictly decreasing"),
        ([1000, 500], "outside"),
        ([500, -1], "outside"),
        ([899.5, 449], "integers"),
        (["899", 449], "integers"),
    ],
)
def test_bad_explicit_grids_get_a_clear_error(grid, message):
    with pytest.raises((ValueError, TypeError), match=message):
        validate_timesteps(grid)


def test_integral_floats_are_accepted_as_integers():
    assert validate_timesteps([899.0, 449.0]) == [899, 449]


@pytest.mark.parametrize("num_steps, total_steps", [(0, 900), (4, 3), (4, 1001)])
def test_bad_uniform_grid_parameters(num_steps, total_steps):
    with pytest.raises(ValueError):
        tdm_timesteps(num_steps, total_steps)
