"""Noise schedules on integer timesteps, and exact conversions between model outputs and x0.

Every backbone TDM distills is seen through one forward process,

    x_t = alpha_t * x0 + sigma_t * eps,        t = 0 .. num_train_timesteps - 1,

VP for DDPM-style models (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)) and rectified
flow for flow-matching models (alpha_t = 1 - sigma_t). The tables are kept in float64 and every
conversion runs in at least float32 whatever the model dtype: dividing by alpha_899 ~ 0.017 in
fp16 amplifies rounding error about 60x (a known defect of the official demo).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_prediction", "sample")

# Where alpha_t = 0 (zero terminal SNR) x0 cannot be recovered from an eps prediction. ComfyUI
# clamps abar_999 to this value for zero-SNR models; we use the same floor so the conversion stays
# finite and agrees with ComfyUI. v-, flow- and x0-predictions need no floor.
ZERO_SNR_ALPHA_CUMPROD_FLOOR = 4.8973451890853435e-08

# The training schedule of SD1.x / SDXL (and the toys that borrow it), as a diffusers config.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The Glide cosine schedule ("squaredcos_cap_v2"), in float64."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0 exactly."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def _flow_shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 time shift: sigma = shift * u / (1 + (shift - 1) * u)."""
    return shift * u / (1 + (shift - 1) * u)


class NoiseSchedule:
    """alpha_t and sigma_t for every integer timestep, plus the x0 conversions of one parameterisation.

    Build it with :meth:`from_diffusers_config` (what the trainer does), :meth:`from_betas`,
    :meth:`from_alphas_cumprod` or :meth:`flow_matching`.
    """

    def __init__(
        self,
        alphas: torch.Tensor,
        sigmas: torch.Tensor,
        prediction_type: str = "epsilon",
        kind: str = "vp",
        shift: float = 1.0,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if kind not in ("vp", "flow"):
            raise ValueError(f"kind must be 'vp' or 'flow', got {kind!r}")
        alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if alphas.shape != sigmas.shape or alphas.numel() < 2:
            raise ValueError("alphas and sigmas must be 1-D tables of the same length (>= 2)")
        if not (torch.isfinite(alphas).all() and torch.isfinite(sigmas).all()):
            raise ValueError("the schedule tables contain non-finite values")
        if (alphas < 0).any() or (sigmas <= 0).any():
            raise ValueError("a schedule needs alpha_t >= 0 and sigma_t > 0 for every timestep")
        self.alphas = alphas
        self.sigmas = sigmas
        self.prediction_type = prediction_type
        self.kind = kind
        self.shift = float(shift)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> NoiseSchedule:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(abar.sqrt(), (1 - abar).sqrt(), prediction_type=prediction_type, kind="vp")

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon") -> NoiseSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls.from_alphas_cumprod(torch.cumprod(1 - betas, dim=0), prediction_type)

    @classmethod
    def flow_matching(cls, shift: float = 1.0, num_train_timesteps: int = 1000) -> NoiseSchedule:
        """Rectified flow as diffusers' FlowMatchEulerDiscreteScheduler tabulates it: timestep index
        t carries the unshifted time u = (t + 1) / T, so t = T - 1 is pure noise (sigma = 1)."""
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        sigmas = _flow_shift(u, shift)
        return cls(1 - sigmas, sigmas, prediction_type="flow_prediction", kind="flow", shift=shift)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], shift: float | None = None) -> NoiseSchedule:
        """Build the schedule a diffusers scheduler config describes.

        Reads beta_start, beta_end, beta_schedule (linear, scaled_linear, squaredcos_cap_v2),
        trained_betas, num_train_timesteps, prediction_type, rescale_betas_zero_snr and
        snr_shift_scale (CogVideoX), and for flow-matching configs (FlowMatch* schedulers, or
        prediction_type "flow_prediction" / use_flow_sigmas) shift or flow_shift. ``shift``
        overrides the config's flow shift (needed where the config uses dynamic shifting).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"expected a scheduler config dict, got {type(config).__name__}")
        class_name = str(config.get("_class_name", ""))
        num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        prediction_type = config.get("prediction_type", "epsilon")

        is_flow = (
            class_name.startswith("FlowMatch")
            or prediction_type == "flow_prediction"
            or bool(config.get("use_flow_sigmas", False))
        )
        if is_flow:
            if shift is None:
                if config.get("use_dynamic_shifting", False):
                    raise ValueError(
                        f"{class_name or 'this scheduler'} uses dynamic (resolution-dependent) shifting; "
                        "pass shift= explicitly for the resolution you train or sample at"
                    )
                shift = float(config.get("shift", config.get("flow_shift", 1.0)))
            return cls.flow_matching(shift=shift, num_train_timesteps=num_train_timesteps)

        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r} for a VP scheduler "
                "(expected epsilon, v_prediction or sample)"
            )
        if config.get("trained_betas") is not None:
            betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
            num_train_timesteps = betas.numel()
        else:
            beta_start = float(config.get("beta_start", 0.0001))
            beta_end = float(config.get("beta_end", 0.02))
            beta_schedule = config.get("beta_schedule", "linear")
            if beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
            elif beta_schedule == "scaled_linear":
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
            elif beta_schedule == "squaredcos_cap_v2":
                betas = _betas_for_alpha_bar(num_train_timesteps)
            else:
                raise ValueError(
                    f"unsupported beta_schedule {beta_schedule!r} (expected linear, scaled_linear or squaredcos_cap_v2)"
                )
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # CogVideoX's "SNR shift following SD3" divides the SNR by snr_shift_scale; diffusers
        # applies it before the zero-terminal-SNR rescale, and so do we.
        snr_shift_scale = float(config.get("snr_shift_scale", 1.0))
        if snr_shift_scale != 1.0:
            alphas_cumprod = alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)
        if config.get("rescale_betas_zero_snr", False):
            alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
        return cls.from_alphas_cumprod(alphas_cumprod, prediction_type)

    # ------------------------------------------------------------------ tables
    @property
    def num_train_timesteps(self) -> int:
        return self.alphas.numel()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t = alpha^2 / (alpha^2 + sigma^2) in float64: the VP schedule with the same SNR
        (for VP schedules this is exactly alpha_t^2)."""
        return self.alphas**2 / (self.alphas**2 + self.sigmas**2)

    @property
    def betas(self) -> torch.Tensor:
        """beta_t = 1 - abar_t / abar_{t-1} (abar_{-1} = 1): the inverse of :meth:`from_betas`."""
        abar = self.alphas_cumprod
        return 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])

    def __repr__(self) -> str:
        extra = f", shift={self.shift}" if self.kind == "flow" else ""
        return (
            f"NoiseSchedule(kind={self.kind!r}, prediction_type={self.prediction_type!r}, "
            f"num_train_timesteps={self.num_train_timesteps}{extra})"
        )

    def _lookup(self, table: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("timesteps must be integers (this schedule is tabulated per integer timestep)")
            t = t.round()
        t = t.long()
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        return table.to(t.device)[t]

    def alpha(self, t) -> torch.Tensor:
        """alpha_t in float64 for integer timesteps t (a scalar or a tensor)."""
        return self._lookup(self.alphas, t)

    def sigma(self, t) -> torch.Tensor:
        """sigma_t in float64 for integer timesteps t (a scalar or a tensor)."""
        return self._lookup(self.sigmas, t)

    def snr(self, t) -> torch.Tensor:
        """alpha_t^2 / sigma_t^2 in float64."""
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def flow_timestep(self, t) -> torch.Tensor:
        """What a flow network (SD3, ComfyUI's CONST models) is fed for table index t: sigma_t * T,
        not t itself (they differ wherever the shift is not 1: index 749 is 900 at shift 3)."""
        return self.sigma(t) * self.num_train_timesteps

    def k_diffusion_sigma(self, t) -> torch.Tensor:
        """The sigma ComfyUI / k-diffusion use for timestep t: sigma_t / alpha_t for VP models (their
        state is x_t / alpha_t), sigma_t itself for flow models (their state is x_t). Infinite at a
        zero-SNR timestep."""
        if self.kind == "flow":
            return self.sigma(t)
        return self.sigma(t) / self.alpha(t)

    # ------------------------------------------------------------------ conversions
    def coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) shaped to broadcast against ``like`` ([B, ...]) in the compute dtype
        (float32, or float64 when ``like`` is float64). ``t`` is a scalar or a [B] tensor."""
        dtype = compute_dtype(like)
        t = torch.as_tensor(t, device=like.device)
        shape = (-1,) + (1,) * (like.dim() - 1) if t.dim() > 0 else ()
        return (
            self.alpha(t).to(like.device, dtype).reshape(shape),
            self.sigma(t).to(like.device, dtype).reshape(shape),
        )

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0.to(alpha.dtype) + sigma * eps.to(alpha.dtype)

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The noise implied by an x0 prediction: eps = (x_t - alpha_t x0) / sigma_t."""
        alpha, sigma = self.coefficients(t, x_t)
        return (x_t.to(alpha.dtype) - alpha * x0.to(alpha.dtype)) / sigma

    def x0_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Convert the network's raw output (its prediction_type) into an x0 prediction."""
        alpha, sigma = self.coefficients(t, x_t)
        output, x_t = output.to(alpha.dtype), x_t.to(alpha.dtype)
        if self.prediction_type == "epsilon":
            floor = math.sqrt(ZERO_SNR_ALPHA_CUMPROD_FLOOR)
            return (x_t - sigma * output) / alpha.clamp_min(floor)
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma x0
            return alpha * x_t - sigma * output
        if self.prediction_type == "flow_prediction":  # velocity u = eps - x0
            return x_t - sigma * output
        return output

    def output_gain(self, t) -> torch.Tensor:
        """|d x0 / d output| at t, float64 [B]: how far a unit change of the network's raw output
        moves its x0 prediction (eps: sigma/alpha, 60x at t = 899 on DDPM's linear betas; v: sigma;
        flow: sigma; x0: 1)."""
        t = torch.as_tensor(t)
        if self.prediction_type == "epsilon":
            floor = math.sqrt(ZERO_SNR_ALPHA_CUMPROD_FLOOR)
            return self.sigma(t) / self.alpha(t).clamp_min(floor)
        if self.prediction_type in ("v_prediction", "flow_prediction"):
            return self.sigma(t)
        return torch.ones(t.shape, dtype=torch.float64)

    def output_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The raw output that a network of this prediction_type gives for an x0 prediction
        (the inverse of :meth:`x0_from_output`)."""
        alpha, sigma = self.coefficients(t, x_t)
        x0, x_t = x0.to(alpha.dtype), x_t.to(alpha.dtype)
        if self.prediction_type == "epsilon":
            return (x_t - alpha * x0) / sigma
        if self.prediction_type == "v_prediction":
            eps = (x_t - alpha * x0) / sigma
            return alpha * eps - sigma * x0
        if self.prediction_type == "flow_prediction":
            return (x_t - x0) / sigma
        return x0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 tensors, float64 for float64 ones."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
