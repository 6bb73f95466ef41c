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
    generator_step_weight,
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

# The loop, the roles and the LoRA files live in their folders (training/, lora/, pipelines/);
# their main names are importable from the top as well, loaded on first use so that
# ``import tdm_train`` stays light (no diffusers / peft / accelerate until they are asked for).
_LAZY = {
    "TDMTrainer": "training.trainer",
    "TrainConfig": "training.trainer",
    "TrainingStopped": "training.trainer",
    "AdapterRoles": "training.roles",
    "save_student_lora": "lora.export",
    "fuse_lora": "lora.merge",
    "match_lora": "lora.merge",
    "recommend": "lora.metadata",
    "StepConditions": "lora.step_embedding",
    "WeightLoraRoles": "lora.weight_wrappers",
    "CogVideoXParts": "pipelines.cogvideox",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    *_LAZY,
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
    "generator_step_weight",
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
