"""NoiseSchedule: tables equal diffusers' and the published sigmas; conversions are exact."""

import math

import pytest
import torch
from conftest import COGVIDEOX_2B_SCHEDULER, PIXART_SCHEDULER, SD3_SCHEDULER, SDXL_SCHEDULER

from tdm_train import NoiseSchedule


def test_sdxl_and_pixart_sigmas_match_the_published_comfyui_values():
    t = torch.tensor([899, 674, 449, 224])
    sdxl = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER).k_diffusion_sigma(t)
    pixart = NoiseSchedule.from_diffusers_config(PIXART_SCHEDULER).k_diffusion_sigma(t)
    assert sdxl.tolist() == pytest.approx([8.3028, 3.0098, 1.3672, 0.6299], abs=1e-4)
    assert pixart.tolist() == pytest.approx([60.27, 10.02, 2.622, 0.831], rel=1e-3)


def test_alphas_cumprod_is_float64_and_one_per_timestep():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.alphas_cumprod.shape == (1000,)
    assert schedule.num_train_timesteps == 1000
    # abar_899 on scaled_linear: the divisor that makes fp16 schedule math dangerous
    assert math.sqrt(schedule.alphas_cumprod[899]) == pytest.approx(0.1196, abs=1e-3)


@pytest.mark.parametrize(
    "config, scheduler_class",
    [
        (SDXL_SCHEDULER, "DDPMScheduler"),
        (PIXART_SCHEDULER, "DDPMScheduler"),
        ({**SDXL_SCHEDULER, "beta_schedule": "squaredcos_cap_v2"}, "DDPMScheduler"),
        ({**SDXL_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, "DDIMScheduler"),
        (COGVIDEOX_2B_SCHEDULER, "CogVideoXDDIMScheduler"),
    ],
)
def test_alphas_cumprod_equal_diffusers(config, scheduler_class):
    import diffusers
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    if scheduler_class != "CogVideoXDDIMScheduler":
        kwargs.pop("snr_shift_scale", None)
    reference = getattr(diffusers, scheduler_class)(**kwargs).alphas_cumprod.double()
    ours = NoiseSchedule.from_diffusers_config(config).alphas_cumprod
    # diffusers builds linear betas in float32; the tables agree to float32 precision
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=1e-7)


def test_cogvideox_schedule_is_zero_terminal_snr_and_snr_shifted():
    schedule = NoiseSchedule.from_diffusers_config(COGVIDEOX_2B_SCHEDULER)
    assert schedule.prediction_type == "v_prediction"
    assert schedule.alpha(999).item() == 0.0
    assert schedule.sigma(999).item() == pytest.approx(1.0)
    unshifted = NoiseSchedule.from_diffusers_config({**COGVIDEOX_2B_SCHEDULER, "snr_shift_scale": 1.0})
    # the SNR shift divides SNR by 3 (before the zero-SNR rescale, so compare away from both ends)
    ratio = unshifted.snr(torch.tensor([1, 100]))[0] / schedule.snr(torch.tensor([1, 100]))[0]
    assert ratio.item() > 2.0


def test_flow_matching_table_equals_diffusers_flowmatch_sigmas():
    import diffusers
    schedule = NoiseSchedule.from_diffusers_config(SD3_SCHEDULER)
    assert schedule.kind == "flow" and schedule.prediction_type == "flow_prediction"
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.double()  # noisiest first
    torch.testing.assert_close(schedule.sigmas.flip(0), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(schedule.alphas, 1 - schedule.sigmas)
    assert schedule.sigma(999).item() == 1.0


def test_flow_configs_recognised_by_prediction_type_and_flow_shift():
    sana_dpm = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction", "flow_shift": 6.0}
    schedule = NoiseSchedule.from_diffusers_config(sana_dpm)
    assert schedule.kind == "flow" and schedule.shift == 6.0
    u = 0.25  # timestep 249: the SD3 shift formula
    assert schedule.sigma(249).item() == pytest.approx(6 * u / (1 + 5 * u))


def test_dynamic_shifting_needs_an_explicit_shift():
    flux = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "shift": 3.0}
    with pytest.raises(ValueError, match="dynamic"):
        NoiseSchedule.from_diffusers_config(flux)
    assert NoiseSchedule.from_diffusers_config(flux, shift=2.5).shift == 2.5


@pytest.mark.parametrize(
    "config, message",
    [
        ({**SDXL_SCHEDULER, "beta_schedule": "sigmoid_typo"}, "beta_schedule"),
        ({**SDXL_SCHEDULER, "prediction_type": "x0_typo"}, "prediction_type"),
    ],
)
def test_bad_configs_are_refused_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_diffusers_config(config)
    with pytest.raises(TypeError, match="config dict"):
        NoiseSchedule.from_diffusers_config(["not", "a", "dict"])


def test_timesteps_outside_the_table_or_fractional_are_refused():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.alpha(1000)
    with pytest.raises(ValueError, match="integers"):
        schedule.alpha(torch.tensor([10.5]))


@pytest.mark.parametrize(
    "config", [SDXL_SCHEDULER, {**SDXL_SCHEDULER, "prediction_type": "v_prediction"}, SD3_SCHEDULER,
               {**SDXL_SCHEDULER, "prediction_type": "sample"}, COGVIDEOX_2B_SCHEDULER]
)
def test_output_x0_round_trip(config):
    schedule = NoiseSchedule.from_diffusers_config(config)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 224, 449, 674, 899, 998])
    x0 = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    output = schedule.output_from_x0(x0, x_t, t)
    torch.testing.assert_close(schedule.x0_from_output(output, x_t, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.eps_from_x0(x0, x_t, t), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "config", [SDXL_SCHEDULER, PIXART_SCHEDULER, {**SDXL_SCHEDULER, "prediction_type": "v_prediction"},
               SD3_SCHEDULER, {**SDXL_SCHEDULER, "prediction_type": "sample"}, COGVIDEOX_2B_SCHEDULER]
)
def test_output_gain_is_how_far_x0_moves_with_the_output(config):
    """output_gain(t) = |d x0 / d output|, read off x0_from_output itself (it is linear in the output)."""
    schedule = NoiseSchedule.from_diffusers_config(config)
    t = torch.tensor([0, 224, 449, 674, 899, 998])
    x_t = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moved = schedule.x0_from_output(out + 0.5, x_t, t) - schedule.x0_from_output(out, x_t, t)
    torch.testing.assert_close(schedule.output_gain(t), (moved / 0.5).abs().mean(dim=1), rtol=1e-9, atol=1e-12)


def test_output_gain_of_eps_prediction_on_linear_betas():
    """The numbers the README's weighting argument rests on (PixArt's / the digits teacher's betas)."""
    gain = NoiseSchedule.from_diffusers_config(PIXART_SCHEDULER).output_gain(torch.tensor([899, 674, 449, 224]))
    assert [round(g, 1) for g in gain.tolist()] == [60.3, 10.0, 2.6, 0.8]


def test_outputs_are_the_textbook_parameterisations():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    vp = NoiseSchedule.from_diffusers_config({**SDXL_SCHEDULER, "prediction_type": "v_prediction"})
    a, s = vp.coefficients(t, x0)
    x_t = a * x0 + s * eps
    torch.testing.assert_close(vp.output_from_x0(x0, x_t, t), a * eps - s * x0)  # v
    flow = NoiseSchedule.from_diffusers_config(SD3_SCHEDULER)
    a, s = flow.coefficients(t, x0)
    torch.testing.assert_close(flow.output_from_x0(x0, a * x0 + s * eps, t), eps - x0)  # velocity


def test_v_and_flow_conversions_stay_finite_where_alpha_is_zero():
    cog = NoiseSchedule.from_diffusers_config(COGVIDEOX_2B_SCHEDULER)
    t = torch.tensor([999, 999])
    x_t = torch.randn(2, 16)
    v = torch.randn(2, 16)
    x0 = cog.x0_from_output(v, x_t, t)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, -v)  # alpha = 0, sigma = 1: x0 = -v exactly
    eps = cog.eps_from_x0(x0, x_t, t)
    torch.testing.assert_close(eps, x_t)  # at pure noise the state is the noise
    flow = NoiseSchedule.flow_matching(shift=3.0)
    assert torch.isfinite(flow.x0_from_output(v, x_t, torch.tensor([999, 999]))).all()
    # an eps model has no x0 at alpha = 0; the ComfyUI floor keeps it finite instead of inf/nan
    eps_model = NoiseSchedule.from_diffusers_config({**COGVIDEOX_2B_SCHEDULER, "prediction_type": "epsilon"})
    assert torch.isfinite(eps_model.x0_from_output(v, x_t, t)).all()


def test_conversions_compute_in_float32_for_half_precision_inputs():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    t = torch.tensor([899, 899])
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    exact = schedule.x0_from_output(eps, x_t, t)
    half = schedule.x0_from_output(eps.half(), x_t.half(), t)
    assert half.dtype == torch.float32
    # only the fp16 rounding of the inputs remains: no fp16 division by alpha_899 = 0.12
    in_fp16_math = ((x_t.half() - schedule.sigma(899).half() * eps.half()) / schedule.alpha(899).half()).double()
    err_ours = (half.double() - exact).abs().max()
    err_fp16 = (in_fp16_math - exact).abs().max()
    assert err_ours < err_fp16


def test_betas_invert_from_betas():
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    torch.testing.assert_close(NoiseSchedule.from_betas(betas).betas, betas, rtol=1e-10, atol=1e-12)
