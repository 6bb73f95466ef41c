"""The few-step sampler: exact on a Gaussian, identical in ComfyUI's k-diffusion convention,
and it keeps every trajectory point for the trainer."""

import pytest
import torch
from conftest import SD3_SCHEDULER, SDXL_SCHEDULER, gaussian_x0

from tdm_train import NoiseSchedule, sample_tdm, tdm_sample, tdm_timesteps
from tdm_train.demos.gaussian_mixture import GaussianMixture

MEAN = torch.tensor([0.7, -1.2], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)


def _affine_map(sample_fn, dim):
    """The deterministic sampler is affine in its noise for Gaussian data: x0 = M z + b."""
    b = sample_fn(torch.zeros(1, dim, dtype=torch.float64))[0]
    columns = [sample_fn(torch.eye(dim, dtype=torch.float64)[i : i + 1])[0] - b for i in range(dim)]
    return torch.stack(columns, dim=1), b


def test_many_step_deterministic_sampler_reproduces_a_gaussian_exactly():
    # zero terminal SNR: N(0, I) at t = 999 IS the marginal, so only discretisation error remains,
    # and it vanishes as O(1 / steps) (DDIM is first order)
    schedule = NoiseSchedule.from_diffusers_config({**SDXL_SCHEDULER, "rescale_betas_zero_snr": True})
    x0_fn = gaussian_x0(MEAN, COV, schedule)
    errors = []
    for grid in (tdm_timesteps(4, 1000), tdm_timesteps(50, 1000), list(range(999, -1, -1))):
        matrix, offset = _affine_map(lambda z: tdm_sample(x0_fn, z, grid, schedule), 2)
        torch.testing.assert_close(offset, MEAN, atol=1e-9, rtol=0)  # the mean is exact at any step count
        errors.append(float((matrix @ matrix.T - COV).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 4e-3  # 1000 steps: covariance within 1% of [[0.5, 0.3], [0.3, 0.4]]
    assert errors[0] > 0.1  # 4 DDIM steps of the teacher itself are far off: what TDM distills away


def test_sampled_moments_agree_with_the_gaussian():
    schedule = NoiseSchedule.from_diffusers_config({**SDXL_SCHEDULER, "rescale_betas_zero_snr": True})
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    samples = tdm_sample(gaussian_x0(MEAN, COV, schedule), noise, tdm_timesteps(100, 1000), schedule)
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), COV, atol=0.04, rtol=0)


def _comfy_discrete_model(schedule, x0_fn):
    """ComfyUI's view of a discrete VP model: state x = x_t / alpha, model(x, sigma) -> x0, the
    timestep recovered as the argmin over log sigma (ComfyUI's ModelSamplingDiscrete.timestep)."""
    table = schedule.sigmas / schedule.alphas

    def model(x, sigma):
        t = (table.log()[None] - sigma.double().log()[:, None]).abs().argmin(dim=1)
        alpha = schedule.alpha(t).to(x.dtype)[:, None]
        return x0_fn(x * alpha, t)

    return model


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_k_diffusion_form_gives_identical_samples_to_the_vp_form(eta):
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    gmm = GaussianMixture.ring()
    x0_fn = lambda x, t: gmm.x0_posterior_mean(x, t, schedule)  # noqa: E731
    grid = tdm_timesteps()
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    vp = tdm_sample(x0_fn, noise, grid, schedule, eta=eta, generator=torch.Generator().manual_seed(7))

    sigmas = torch.cat([schedule.k_diffusion_sigma(torch.tensor(grid)), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(7)
    noise_sampler = lambda s, s_next: torch.randn(noise.shape, generator=gen, dtype=noise.dtype)  # noqa: E731
    x_start = noise * torch.sqrt(1 + sigmas[0] ** 2)  # pure N(0, I) at t_K, in ComfyUI's scaling
    seen = []
    kd = sample_tdm(
        _comfy_discrete_model(schedule, x0_fn), x_start, sigmas, callback=seen.append, eta=eta, noise_sampler=noise_sampler
    )
    torch.testing.assert_close(kd, vp, rtol=0, atol=1e-10)
    assert [step["i"] for step in seen] == [0, 1, 2, 3]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_deterministic_k_diffusion_step_is_comfyuis_euler_step():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    gmm = GaussianMixture.ring()
    model = _comfy_discrete_model(schedule, lambda x, t: gmm.x0_posterior_mean(x, t, schedule))
    sigmas = torch.cat([schedule.k_diffusion_sigma(torch.tensor(tdm_timesteps())), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(64, 2, dtype=torch.float64) * sigmas[0]
    euler = x.clone()
    for i in range(4):  # k-diffusion sample_euler without churn
        denoised = model(euler, sigmas[i] * euler.new_ones(64))
        euler = euler + (sigmas[i + 1] - sigmas[i]) * (euler - denoised) / sigmas[i]
    torch.testing.assert_close(sample_tdm(model, x, sigmas), euler, rtol=0, atol=1e-10)


def test_flow_model_in_comfyui_const_convention_matches_the_flow_form():
    schedule = NoiseSchedule.from_diffusers_config(SD3_SCHEDULER)
    gmm = GaussianMixture.ring()
    x0_fn = lambda x, t: gmm.x0_posterior_mean(x, t, schedule)  # noqa: E731
    grid = [999, 899, 749, 499]
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    flow = tdm_sample(x0_fn, noise, grid, schedule)

    def model(x, sigma):  # CONST: the state is x_t itself, sigma is the flow sigma
        t = (schedule.sigmas[None] - sigma.double()[:, None]).abs().argmin(dim=1)
        return x0_fn(x, t)

    sigmas = torch.cat([schedule.k_diffusion_sigma(torch.tensor(grid)), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sample_tdm(model, noise, sigmas, flow=True), flow, rtol=0, atol=1e-10)


def test_trajectory_keeps_every_point_and_prediction():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    calls = []

    def x0_fn(x, t):
        calls.append(t.clone())
        return 0.5 * x

    noise = torch.randn(3, 2, 4, 4)
    grid = tdm_timesteps()
    final, traj = tdm_sample(x0_fn, noise, grid, schedule, return_trajectory=True)
    assert [int(t[0]) for t in calls] == grid and all(t.dtype == torch.long and t.shape == (3,) for t in calls)
    assert len(traj.states) == len(traj.x0_preds) == len(traj.eps_preds) == 4
    torch.testing.assert_close(traj.states[0], noise)
    torch.testing.assert_close(traj.sample, final)
    for k in range(3):
        a, s = schedule.coefficients(grid[k + 1], noise)
        torch.testing.assert_close(traj.states[k + 1], a * traj.x0_preds[k] + s * traj.eps_preds[k])
        a_t, s_t = schedule.coefficients(grid[k], noise)
        torch.testing.assert_close(traj.eps_preds[k], (traj.states[k] - a_t * traj.x0_preds[k]) / s_t)
    x_t, t, x0_hat, eps_hat = traj.gather(torch.tensor([2, 0, 3]))
    assert t.tolist() == [449, 899, 224]
    torch.testing.assert_close(x_t[1], traj.states[0][1])
    torch.testing.assert_close(x0_hat[0], traj.x0_preds[2][0])
    torch.testing.assert_close(eps_hat[2], traj.eps_preds[3][2])


def test_eta_one_renoises_with_fresh_noise_only():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    x0_value = torch.full((2, 3), 0.25)
    _, traj = tdm_sample(
        lambda x, t: x0_value, torch.randn(2, 3), [899, 449], schedule, eta=1.0,
        generator=torch.Generator().manual_seed(11), return_trajectory=True,
    )
    fresh = torch.randn(2, 3, generator=torch.Generator().manual_seed(11))
    a, s = schedule.coefficients(449, x0_value)
    torch.testing.assert_close(traj.states[1], a * x0_value + s * fresh)


def test_state_stays_float32_for_a_half_precision_model_and_bad_eta_is_refused():
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER)
    out = tdm_sample(lambda x, t: (0.5 * x).half(), torch.randn(2, 4), tdm_timesteps(), schedule)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="eta"):
        tdm_sample(lambda x, t: x, torch.randn(2, 4), tdm_timesteps(), schedule, eta=1.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        tdm_sample(lambda x, t: x, torch.randn(2, 4), [224, 449], schedule)
