"""TDM Scheduler, TDM Sampler and TDM KSampler: the student's trained timesteps in ComfyUI."""

from __future__ import annotations

import logging

import torch

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from tdm_train.presets import PRESETS, RECORDED_GRID_OPTION, sampling_grid
from tdm_train.sampler import sample_tdm

from .sigmas import grid_sigmas, starts_from_pure_noise
from .step_condition import sampled_conditions, with_num_steps
from .v3_api import io

CATEGORY = "sampling/TDM"


def tdm_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, num_steps=None):
    """tdm_train's sampler under ComfyUI's k-diffusion protocol: the flavour of the state (VE for
    discrete models, CONST for flow models) comes from the model's own model_sampling, and fresh
    noise for eta > 0 from ComfyUI's seeded noise sampler. The model calls carry the step count K
    (``num_steps``, default: the steps sampled, ``len(sigmas) - 1``) for a TDM-unify student's
    step condition (nodes/step_condition.py), which refuses a K it was not trained for."""
    extra_args = {} if extra_args is None else extra_args
    extra_args = with_num_steps(extra_args, num_steps if num_steps is not None else len(sigmas) - 1)
    model_sampling = model.inner_model.inner_model.model_sampling
    flow = isinstance(model_sampling, comfy.model_sampling.CONST)
    noise_sampler = None
    if eta > 0:
        noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    return sample_tdm(model, x, sigmas, extra_args, callback, disable, eta=eta, noise_sampler=noise_sampler, flow=flow)


class TDMKSAMPLER(comfy.samplers.KSAMPLER):
    """KSAMPLER that starts txt2img from pure N(0, I) at the first trained timestep (noise *
    sqrt(1 + sigma^2) in ComfyUI's space, not noise * sigma: 0.72% too small for SDXL at t=899)."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self._pure_noise = denoise_mask is None and starts_from_pure_noise(latent_image)
        if (not self._pure_noise and "num_steps" not in self.extra_options
                and sampled_conditions((extra_args or {}).get("model_options")) is not None):
            logging.warning("TDM Sampler: img2img on a TDM-unify student: it is conditioned on K = %d, the number "
                            "of steps these sigmas have. If they are a K-grid cut at a denoise level, the student "
                            "of that grid's K is the one to ask for: use the TDM KSampler (its denoise keeps the "
                            "full grid's K)", len(sigmas) - 1)
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def max_denoise(self, model_wrap, sigmas):
        return getattr(self, "_pure_noise", False) or super().max_denoise(model_wrap, sigmas)


def tdm_sampler(eta: float = 0.0, num_steps: int | None = None) -> TDMKSAMPLER:
    """``num_steps``: the K a TDM-unify student is conditioned on when it is not the number of
    steps sampled (the TDM KSampler's img2img: its K-grid cut at the denoise level)."""
    options = {"eta": float(eta)} if num_steps is None else {"eta": float(eta), "num_steps": int(num_steps)}
    return TDMKSAMPLER(tdm_sampler_function, extra_options=options)


def _grid_inputs():
    return [
        io.Combo.Input("preset", options=list(PRESETS), default="tdm_uniform",
                       tooltip="tdm_uniform: t_k = k*total_steps//steps - 1 (899/674/449/224); cogvideox: "
                               "999/856/665/399; flow_shifted: SD3/SD3.5 LoRAs (flow sigmas with shift); "
                               "custom: the comma list below; recorded: the grid the TDM LoRA on this model was "
                               "trained on (TDM LoRA Loader / TDM Train LoRA)"),
        io.Int.Input("steps", default=4, min=1, max=8, tooltip="student steps K (tdm_uniform, flow_shifted)"),
        io.Int.Input("total_steps", default=900, min=1, max=1000, tooltip="T_s of the uniform grid (TDM demo: 900)"),
        io.Float.Input("shift", default=6.0, min=0.1, max=20.0, step=0.1,
                       tooltip="flow shift of flow_shifted (official SD3 TDM LoRA: 6; SD3.5: 3)"),
        io.String.Input("custom_timesteps", default="899, 674, 449, 224", tooltip="comma list, noisiest first"),
    ]


def _eta_input():
    return io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.05,
                          tooltip="0: deterministic DDIM (as trained); 1: fresh noise at every step")


def _denoise_input():
    return io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                          tooltip="img2img: keep only trained timesteps at or below this noise level")


def recorded_grid(model) -> list[int] | None:
    """The trained grid the TDM LoRA Loader / TDM Train LoRA put on this MODEL (None if none)."""
    return model.model_options.get(RECORDED_GRID_OPTION)


def _sigmas(model, preset, steps, total_steps, shift, custom_timesteps, denoise) -> torch.Tensor:
    grid = sampling_grid(preset, steps, total_steps, shift, custom_timesteps, denoise, recorded=recorded_grid(model))
    return grid_sigmas(model.get_model_object("model_sampling"), grid)


class TDMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMScheduler",
            display_name="TDM Scheduler",
            category=CATEGORY,
            description="SIGMAS at a TDM student's trained timesteps, from the model's own noise schedule.",
            inputs=[io.Model.Input("model"), *_grid_inputs(), _denoise_input()],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, preset, steps, total_steps, shift, custom_timesteps, denoise) -> io.NodeOutput:
        return io.NodeOutput(_sigmas(model, preset, steps, total_steps, shift, custom_timesteps, denoise))


class TDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMSampler",
            display_name="TDM Sampler",
            category=CATEGORY,
            description="The TDM few-step sampler for SamplerCustom / SamplerCustomAdvanced: deterministic "
                        "(eta 0, as trained) or re-noising with fresh noise (eta up to 1).",
            inputs=[_eta_input()],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta) -> io.NodeOutput:
        return io.NodeOutput(tdm_sampler(eta))


class TDMKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMKSampler",
            display_name="TDM KSampler",
            category=CATEGORY,
            description="Few-step sampling of a TDM student in one node: trained timesteps, TDM sampler, "
                        "cfg 1 by default (one model call per step).",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                *_grid_inputs(),
                _eta_input(),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="TDM students run at 1.0; above 1 needs a negative"),
                _denoise_input(),
                io.Conditioning.Input("negative", optional=True),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, preset, steps, total_steps, shift, custom_timesteps,
                eta, cfg, denoise, negative=None) -> io.NodeOutput:
        if negative is None and cfg != 1.0:
            raise ValueError(f"TDM KSampler: cfg {cfg} needs a negative conditioning (or set cfg to 1.0)")
        sigmas = _sigmas(model, preset, steps, total_steps, shift, custom_timesteps, denoise)
        full_grid = sampling_grid(preset, steps, total_steps, shift, custom_timesteps, 1.0, recorded=recorded_grid(model))
        num_steps = len(full_grid.timesteps or full_grid.sigmas)  # img2img: the K of the grid it cuts
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        guider = comfy.samplers.CFGGuider(model)
        conds = {"positive": positive} if negative is None else {"positive": positive, "negative": negative}
        guider.inner_set_conds(conds)
        guider.set_cfg(cfg)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        out = guider.sample(noise, samples, tdm_sampler(eta, num_steps), sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(latent)


NODES = [TDMScheduler, TDMSampler, TDMKSampler]
