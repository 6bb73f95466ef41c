"""tdm_train: Trajectory Distribution Matching (Luo et al., ICCV 2025) for few-step diffusion.

The core written once against the x0-predictor protocol: noise schedules, the TDM timestep
grids, the few-step sampler (which is also the student's training rollout) and the objectives.
This package never imports ComfyUI.
"""

from .distill import TDMConfig, TDMObjective
from .objectives import (
    cfg_x0,
    diffuse,
    effective_noise,
    fake_score_loss,
    generator_loss,
    generator_normalizer,
    generator_target,
    importance_weight,
    mid_timesteps,
    min_snr_weight,
    pseudo_huber_constant,
    sample_tau,
    transition_coefficients,
)
from .sampler import TDMTrajectory, predicted_noise, renoise, sample_tdm, tdm_sample
from .schedule import NoiseSchedule
from .timesteps import COGVIDEOX_TIMESTEPS, shifted_timesteps, tdm_timesteps, validate_timesteps

__version__ = "0.1.0"

__all__ = [
    "COGVIDEOX_TIMESTEPS",
    "NoiseSchedule",
    "TDMConfig",
    "TDMObjective",
    "TDMTrajectory",
    "cfg_x0",
    "diffuse",
    "effective_noise",
    "fake_score_loss",
    "generator_loss",
    "generator_normalizer",
    "generator_target",
    "importance_weight",
    "mid_timesteps",
    "min_snr_weight",
    "predicted_noise",
    "pseudo_huber_constant",
    "renoise",
    "sample_tau",
    "sample_tdm",
    "shifted_timesteps",
    "tdm_sample",
    "tdm_timesteps",
    "transition_coefficients",
    "validate_timesteps",
]
