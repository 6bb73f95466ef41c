"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): the TDM nodes' sigmas and sampler
against ComfyUI's own model_sampling classes and KSAMPLER machinery. Prints one JSON object.

    python check_sampler_in_comfy.py PACK_ROOT
"""

import json
import sys
import types
from pathlib import Path

PACK_ROOT = Path(sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from pack_loader import load_pack  # noqa: E402

import comfy.model_sampling as ms  # noqa: E402


def model_sampling(kind, **settings):
    parents = {"eps": (ms.ModelSamplingDiscrete, ms.EPS), "flow": (ms.ModelSamplingDiscreteFlow, ms.CONST)}[kind]

    class ModelSampling(*parents):
        pass

    config = types.SimpleNamespace(sampling_settings=settings)
    return ModelSampling(config)


def main():
    sampling = load_pack(PACK_ROOT, "nodes.sampling")
    from tdm_train import NoiseSchedule, tdm_sample
    from tdm_train.demos.gaussian_mixture import GaussianMixture
    from tdm_train.presets import sampling_grid

    out = {}
    sdxl = model_sampling("eps", beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
    pixart = model_sampling("eps", beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02)
    grid = sampling_grid()
    out["sdxl_sigmas"] = sampling.grid_sigmas(sdxl, grid).tolist()
    out["pixart_sigmas"] = sampling.grid_sigmas(pixart, grid).tolist()
    out["sdxl_timesteps_seen"] = [float(sdxl.timestep(s)) for s in sampling.grid_sigmas(sdxl, grid)[:-1]]

    # the whole KSAMPLER path (noise scaling, KSamplerX0Inpaint, our sampler function) on an exact teacher
    schedule = NoiseSchedule.from_diffusers_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                    "beta_end": 0.012})
    gmm = GaussianMixture.ring()

    class ModelWrap:  # what comfy.samplers hands a KSAMPLER: model(x, sigma, ...) -> x0 in VE space
        inner_model = types.SimpleNamespace(model_sampling=sdxl)

        def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
            t = sdxl.timestep(sigma).long()
            alpha = schedule.alpha(t).to(x.dtype)[:, None]
            return gmm.x0_posterior_mean(x * alpha, t, schedule).to(x.dtype)

    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = sampling.grid_sigmas(sdxl, grid).double()
    steps_seen = []
    comfy_sample = sampling.tdm_sampler(0.0).sample(
        ModelWrap(), sigmas, {"seed": 1}, lambda *a: steps_seen.append(a[0]), noise,
        latent_image=torch.zeros_like(noise))
    reference = tdm_sample(lambda x, t: gmm.x0_posterior_mean(x, t, schedule), noise, list(grid.timesteps), schedule)
    out["ksampler_vs_tdm_sample_max_abs"] = float((comfy_sample - reference).abs().max())
    out["callback_steps"] = steps_seen
    # stock KSAMPLER scaling (no pure-noise start) is measurably off: what the override fixes
    stock = sampling.comfy.samplers.KSAMPLER(sampling.tdm_sampler_function, {"eta": 0.0})
    stock_sample = stock.sample(ModelWrap(), sigmas, {"seed": 1}, None, noise, latent_image=torch.zeros_like(noise))
    out["stock_scaling_max_abs"] = float((stock_sample - reference).abs().max())
    # stochastic run goes through ComfyUI's seeded noise sampler and stays finite
    noisy = sampling.tdm_sampler(0.5).sample(ModelWrap(), sigmas, {"seed": 1}, None, noise,
                                             latent_image=torch.zeros_like(noise))
    out["eta_half_finite"] = bool(torch.isfinite(noisy).all())
    out["eta_half_differs"] = float((noisy - reference).abs().max())

    flow = model_sampling("flow", shift=3.0)
    out["flow_sigmas"] = sampling.grid_sigmas(flow, sampling_grid("flow_shifted", shift=6.0)).tolist()
    out["flow_model_timesteps"] = [float(flow.timestep(s)) for s in torch.tensor(out["flow_sigmas"][:-1])]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
