"""Test double of ComfyUI 0.3.64's ``comfy.samplers`` (commit a125cd84): Sampler and KSAMPLER with
ComfyUI's signatures and ComfyUI's max_denoise; KSAMPLER.sample runs nothing."""

import math


class Sampler:
    def sample(self):
        pass

    def max_denoise(self, model_wrap, sigmas):
        """As in ComfyUI: True when sigmas[0] is sigma_max (rel. tol. 1e-5) or above it."""
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


class KSAMPLER(Sampler):
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        """ComfyUI's signature; the double neither scales the noise nor samples: noise comes back as is."""
        return noise
