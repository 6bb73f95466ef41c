"""The TDM sampler on a real (tiny, SDXL-shaped) diffusers UNet: in ComfyUI's k-diffusion
convention it gives the same sample as tdm_sample."""

import pytest
import torch
from test_presets import ComfyDiscreteModelSampling

from tdm_train import NoiseSchedule, sample_tdm, tdm_sample, tdm_timesteps

import diffusers

from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_conditioning, tiny_sdxl_unet  # noqa: E402


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_k_diffusion_wrapped_diffusers_unet_matches_tdm_sample(eta):
    unet = tiny_sdxl_unet()
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    cond = tiny_sdxl_conditioning(2)
    grid = tdm_timesteps()

    @torch.no_grad()
    def x0_fn(x_t, t):  # the VP view: eps-prediction converted exactly
        eps = unet(x_t, t, **cond).sample
        return schedule.x0_from_output(eps, x_t, t)

    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vp = tdm_sample(x0_fn, noise, grid, schedule, eta=eta, generator=torch.Generator().manual_seed(5))

    # ComfyUI's view: ModelSamplingDiscrete + EPS. State x = x_t / alpha, the network sees
    # x / sqrt(1 + sigma^2) at timestep argmin |log sigma_t - log sigma|, and x0 = x - sigma * eps.
    comfy_ms = ComfyDiscreteModelSampling("linear", 0.00085, 0.012)

    @torch.no_grad()
    def comfy_model(x, sigma):
        t = (comfy_ms.log_sigmas[None] - sigma.log()[:, None]).abs().argmin(dim=1)
        s = sigma[:, None, None, None]
        eps = unet(x / torch.sqrt(1 + s**2), t, **cond).sample
        return x - s * eps

    sigmas = torch.cat([comfy_ms.sigma(torch.tensor(grid, dtype=torch.float32)), torch.zeros(1)])
    gen = torch.Generator().manual_seed(5)
    kd = sample_tdm(comfy_model, noise * torch.sqrt(1 + sigmas[0] ** 2), sigmas, eta=eta,
                    noise_sampler=lambda s, s_next: torch.randn(noise.shape, generator=gen))
    assert (kd - vp).abs().max() < 5e-5
    assert vp.abs().max() > 0.1  # a real sample, not a degenerate zero
