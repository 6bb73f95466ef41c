"""Sampling presets, the ComfyUI sigma grids, and LoRA recommendations (no ComfyUI needed)."""

import importlib
import json

import numpy as np
import pytest
import torch
from test_package import _import_pack_like_comfyui

from tdm_train import NoiseSchedule, tdm_timesteps
from tdm_train.lora.metadata import describe_unmatched, recommend
from tdm_train.presets import SamplingGrid, flow_sigmas, parse_timestep_list, sampling_grid


class ComfyDiscreteModelSampling:
    """ComfyUI's ModelSamplingDiscrete as documented: sigma table sqrt((1 - abar) / abar) from the
    betas ("linear" means sqrt-spaced, diffusers' scaled_linear; "sqrt_linear" is diffusers'
    linear), sigma(t) interpolating log sigma linearly. Built with numpy, independently of
    tdm_train's NoiseSchedule."""

    def __init__(self, beta_schedule, start, end, n=1000):
        if beta_schedule == "linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(start, end, n, dtype=np.float64)
        abar = np.cumprod(1 - betas)
        self.log_sigmas = torch.tensor(np.log(((1 - abar) / abar) ** 0.5), dtype=torch.float32)
        self.sigma_max = float(self.log_sigmas[-1].exp())

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), 0, len(self.log_sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


@pytest.fixture(scope="module")
def grid_sigmas():
    pack = _import_pack_like_comfyui()
    return importlib.import_module(pack.__name__ + ".nodes.sigmas").grid_sigmas


def test_reference_sigmas_through_a_comfyui_compatible_model_sampling(grid_sigmas):
    sdxl = grid_sigmas(ComfyDiscreteModelSampling("linear", 0.00085, 0.012), sampling_grid())
    pixart = grid_sigmas(ComfyDiscreteModelSampling("sqrt_linear", 0.0001, 0.02), sampling_grid())
    assert sdxl.dtype == torch.float32 and sdxl[-1] == 0.0 and bool((sdxl[:-1] > sdxl[1:]).all())
    assert sdxl.tolist() == pytest.approx([8.3028, 3.0098, 1.3672, 0.6299, 0.0], abs=1e-4)
    assert pixart.tolist() == pytest.approx([60.27, 10.02, 2.622, 0.831, 0.0], rel=1e-3)


def test_comfyui_grid_equals_the_vp_grid_of_tdm_train(grid_sigmas):
    schedule = NoiseSchedule.from_diffusers_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    for grid in (sampling_grid(), sampling_grid(steps=8), sampling_grid("cogvideox"),
                 sampling_grid("custom", custom="999, 500, 1")):
        comfy = grid_sigmas(ComfyDiscreteModelSampling("linear", 0.00085, 0.012), grid)[:-1].double()
        ours = schedule.k_diffusion_sigma(torch.tensor(grid.timesteps))
        torch.testing.assert_close(comfy, ours, rtol=2e-6, atol=0)


def test_presets():
    assert sampling_grid().timesteps == (899, 674, 449, 224)
    assert sampling_grid(steps=1).timesteps == (899,)
    assert sampling_grid(steps=8).timesteps == tuple(tdm_timesteps(8, 900))
    assert sampling_grid("cogvideox").timesteps == (999, 856, 665, 399)
    assert sampling_grid("custom", custom=" 999; 749 ,500,250").timesteps == (999, 749, 500, 250)
    flow = sampling_grid("flow_shifted", steps=4, shift=6.0)
    assert flow.timesteps is None
    # diffusers DPMSolverMultistep(use_flow_sigmas, flow_shift=6), the official SD3 TDM recipe
    assert [1000 * s for s in flow.sigmas] == pytest.approx([999.83, 947.17, 856.90, 666.37], abs=0.01)
    assert [1000 * s for s in flow_sigmas(4, 3.0)] == pytest.approx([999.67, 899.64, 749.62, 499.67], abs=0.01)
    assert flow_sigmas(4, 1.0) == pytest.approx([0.999, 0.74925, 0.4995, 0.24975])


def test_flow_sigmas_equal_diffusers_dpm_solver_flow_sigmas():
    import diffusers
    scheduler = diffusers.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=6.0)
    scheduler.set_timesteps(4)
    assert flow_sigmas(4, 6.0) == pytest.approx(scheduler.sigmas[:-1].tolist(), rel=1e-6)


def test_denoise_keeps_only_trained_points():
    assert sampling_grid(denoise=0.9).timesteps == (899, 674, 449, 224)
    assert sampling_grid(denoise=0.5).timesteps == (449, 224)
    assert sampling_grid("cogvideox", denoise=0.7).timesteps == (665, 399)
    assert len(sampling_grid("flow_shifted", denoise=0.9).sigmas) == 2
    with pytest.raises(ValueError, match="below every trained timestep"):
        sampling_grid(denoise=0.1)


@pytest.mark.parametrize("text, message", [("", "empty"), ("899, abc", "integers"), ("224, 449", "decreasing"),
                                           ("1200", "outside")])
def test_bad_custom_lists(text, message):
    with pytest.raises(ValueError, match=message):
        parse_timestep_list(text)


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        sampling_grid("karras")
    with pytest.raises(ValueError, match="denoise"):
        sampling_grid(denoise=0.0)
    with pytest.raises(ValueError):
        SamplingGrid()


def test_lora_recommendations():
    sd3 = recommend({}, "loras/TDM_sd3_lora.safetensors")
    assert sd3.strength == 0.125 and sd3.sampling["preset"] == "flow_shifted" and sd3.sampling["shift"] == 6.0
    assert recommend({}, "tdm-sd3.5-medium.safetensors").sampling["shift"] == 3.0
    assert recommend({}, "tdm_cogvideox_2b.safetensors").sampling["preset"] == "cogvideox"
    assert recommend({}, "some_style_lora.safetensors") is None
    ours = recommend({"tdm.lora_strength": "0.75", "tdm.sampling": json.dumps({"preset": "tdm_uniform"})},
                     "tdm_sd3_lora.safetensors")
    assert ours.strength == 0.75 and ours.source == "metadata tdm.lora_strength"  # metadata beats the name
    with pytest.raises(ValueError, match="not a number"):
        recommend({"tdm.lora_strength": "strong"}, "x.safetensors")
    with pytest.raises(ValueError, match="JSON"):
        recommend({"tdm.lora_strength": "1", "tdm.sampling": "{"}, "x.safetensors")


def test_unmatched_key_report_lists_the_keys():
    keys = [f"lora_te_text_model_{i}.lora_up.weight" for i in range(20)]
    text = describe_unmatched(keys, 40)
    assert text.startswith("20 of 40 LoRA keys matched no weight of this model: ")
    assert "lora_te_text_model_0.lora_up.weight" in text and "(+8 more)" in text


def test_recorded_preset_is_the_grid_the_loaded_lora_was_trained_on():
    grid = sampling_grid("recorded", recorded=[999, 749, 499, 249])
    assert grid.timesteps == (999, 749, 499, 249)
    assert sampling_grid("recorded", denoise=0.5, recorded=[999, 749, 499, 249]).timesteps == (499, 249)
    with pytest.raises(ValueError, match="carries no TDM LoRA grid"):
        sampling_grid("recorded")
    with pytest.raises(ValueError):
        sampling_grid("recorded", recorded=[249, 999])  # not a valid (decreasing) grid
