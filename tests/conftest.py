import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from comfy_stubs import install

from tdm_train.schedule import SDXL_SCHEDULER_CONFIG

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = str(ROOT).replace(".", "_x_")  # the module name ComfyUI's load_custom_node gives the pack

SDXL_SCHEDULER = SDXL_SCHEDULER_CONFIG
PIXART_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}
COGVIDEOX_2B_SCHEDULER = {
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 3.0,
    "timestep_spacing": "trailing",
}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def gaussian_x0(mean: torch.Tensor, cov: torch.Tensor, schedule):
    """The exact x0-predictor of N(mean, cov) data: E[x0 | x_t] = mean + cov a (a^2 cov + s^2 I)^-1 (x_t - a mean)."""

    def x0_fn(x_t, t):
        alpha, sigma = schedule.coefficients(t, x_t)  # [B, 1]
        x = x_t.to(alpha.dtype)
        m, c = mean.to(alpha.dtype), cov.to(alpha.dtype)
        eye = torch.eye(m.numel(), dtype=alpha.dtype)
        a, s = alpha[:, :, None], sigma[:, :, None]  # [B, 1, 1]
        marginal_cov = a**2 * c + s**2 * eye  # [B, D, D]
        gain = a * torch.linalg.solve(marginal_cov, c.expand_as(marginal_cov)).transpose(1, 2)  # a C M^-1
        return m + (gain @ (x - alpha * m)[:, :, None])[:, :, 0]

    return x0_fn


# ----------------------------------------------------------------------------- the pack over ComfyUI test doubles
def _pack_modules() -> list[str]:
    return [name for name in sys.modules if name == PACK_NAME or name.startswith(PACK_NAME + ".")]


@pytest.fixture
def stubs(monkeypatch):
    """The ComfyUI doubles in sys.modules for this test only (monkeypatch removes them)."""
    return install(monkeypatch)


@pytest.fixture
def pack(stubs):
    """The pack imported as ComfyUI imports it, over the stubs. Its modules imported here (which
    hold stub classes) are dropped afterwards and whatever was there before is put back, so later
    tests import the pack in a clean state."""
    saved = {name: sys.modules.pop(name) for name in _pack_modules()}
    try:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in _pack_modules():
            del sys.modules[name]
        sys.modules.update(saved)


def submodule(pack, name):
    return importlib.import_module(f"{pack.__name__}.nodes{'.' + name if name else ''}")


