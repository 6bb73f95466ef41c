"""The SD3 / SD3.5 backend (SD3Transformer2DModel on rectified flow): its schedule is diffusers'
own sigma table, the network is fed sigma * 1000, a TDM step is the flow ODE's Euler step, and
TDM trains a LoRA on every attention projection (SD3.5's dual-attention layers included) that
diffusers loads back, within the DDPM backends' count of network evaluations per iteration."""

import pytest
import torch
from safetensors.torch import load_file

from tdm_train.backends import SD3Backend
from tdm_train.distill import TDMConfig
from tdm_train.training.trainer import TDMTrainer, TrainConfig

# stabilityai/stable-diffusion-3.5-medium's (and SD3-Medium's) scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)
VARIANTS = {"sd3": BASE, "sd3.5": {**BASE, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}}


def _transformer(variant, seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**VARIANTS[variant]).eval()


def _bank(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(n, 5, 16, generator=gen), "pooled_prompt_embeds": torch.randn(n, 8, generator=gen)}


def _backend(variant="sd3.5"):
    negative = {k: torch.zeros(1, *v.shape[1:]) for k, v in _bank(1).items()}
    return SD3Backend(_transformer(variant), SD3_SCHEDULER_CONFIG, negative, resolution=64)


def test_the_schedule_is_diffusers_sigma_table_and_the_network_is_fed_sigma_times_1000():
    from diffusers import FlowMatchEulerDiscreteScheduler

    backend = _backend()
    reference = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SD3_SCHEDULER_CONFIG.items() if k != "_class_name"})
    index = torch.arange(1000)
    # diffusers' training table: sigmas[i] for timestep i counted from pure noise
    torch.testing.assert_close(backend.schedule.sigma(index).float(), reference.sigmas.flip(0).float(), atol=1e-6, rtol=0)
    fed = backend.network_timestep(torch.tensor([999, 749, 499, 249]))
    torch.testing.assert_close(fed.float(), torch.tensor([1000.0, 900.0, 750.0, 500.0]))  # shift 3: not the index

    cond = {k: v[:2] for k, v in _bank().items()}
    x = torch.randn(backend.latent_shape(2))
    t, t_next = torch.tensor([749, 749]), torch.tensor([499, 499])
    with torch.no_grad():
        velocity = backend.model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                                 pooled_projections=cond["pooled_prompt_embeds"], timestep=torch.tensor([900.0, 900.0]),
                                 return_dict=False)[0]
        by_index = backend.model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                                 pooled_projections=cond["pooled_prompt_embeds"], timestep=t.float(), return_dict=False)[0]
        x0 = backend.x0(x, t, cond)
    assert (velocity - by_index).abs().max() > 1e-4  # feeding the index would be another network input
    torch.testing.assert_close(x0, x - 0.9 * velocity, atol=1e-5, rtol=0)  # x0 = x_t - sigma u
    # the deterministic TDM step is the Euler step of the flow ODE: x + (sigma_next - sigma) u
    schedule = backend.schedule
    eps = schedule.eps_from_x0(x0, x, t)
    step = schedule.add_noise(x0, eps, t_next)
    torch.testing.assert_close(step, x + (0.75 - 0.9) * velocity, atol=1e-5, rtol=0)


def test_the_default_targets_are_the_official_releases_whose_names_comfyui_takes_at_full_size():
    """tests/test_convert.py checks every LoRA module name of these targets on the full SD3.5-Medium
    architecture (meta device) against ComfyUI's SD3 key map; the trainer writes the same names."""
    from tdm_train.convert import RELEASES

    assert set(SD3Backend.default_lora_targets) == set(RELEASES["tdm-sd3.5-medium"].targets)


def test_min_snr_weighting_on_flow_is_min_of_the_flow_snr_and_gamma():
    """The fake score's x0-loss weight (TDM_SPEC's Min-SNR-5) on rectified flow: min(((1 - s) / s)^2, 5)."""
    from tdm_train.objectives import min_snr_weight

    backend = _backend()
    t = torch.tensor([999, 749, 499, 249, 49])
    sigma = backend.schedule.sigma(t)
    expected = torch.minimum(((1 - sigma) / sigma) ** 2, torch.tensor(5.0, dtype=sigma.dtype))
    torch.testing.assert_close(min_snr_weight(backend.schedule, t, 5.0), expected)
    assert float(min_snr_weight(backend.schedule, t, 5.0)[0]) == 0.0  # pure noise carries no x0 signal


def test_a_ddpm_scheduler_config_is_refused():
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        SD3Backend(_transformer("sd3"), {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear"}, {}, 64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tdm_trains_every_attention_projection_within_8_forwards_and_diffusers_loads_the_lora(tmp_path, variant):
    from diffusers import SD3Transformer2DModel

    backend = _backend(variant)
    calls = []
    backend.model.register_forward_hook(lambda module, args, output: calls.append(1))
    config = TrainConfig(output_dir=str(tmp_path), max_train_steps=2, train_batch_size=2, learning_rate=1e-3,
                         lora_rank=4, lora_alpha=8, checkpointing_steps=2,
                         tdm=TDMConfig(total_steps=1000, guidance_scale=3.5))
    trainer = TDMTrainer(backend, _bank(), config)
    assert trainer.objective.timesteps == [999, 749, 499, 249]
    calls.clear()
    trainer.train_step()
    assert 0 < len(calls) <= 8  # network evaluations of one iteration (CFG batched into one call)
    summary = trainer.train(progress=False)
    assert summary["nonfinite_total"] == 0

    files = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "tdm_lora_comfyui.safetensors"
    diffusers_keys, comfy = load_file(str(files[0])), load_file(str(files[1]))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in diffusers_keys}
    # both blocks: q, k, v, out, add_q, add_k, add_v (+ to_add_out but in the last, context_pre_only block)
    expected = 2 * 7 + 1 + (4 if variant == "sd3.5" else 0)  # SD3.5: block 0's attn2 q, k, v, out
    assert len(modules) == expected
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {8.0}
    assert all(k.startswith("transformer.") for k in comfy)

    with torch.no_grad():
        x = torch.randn(2, 4, 8, 8)
        inputs = dict(hidden_states=x, encoder_hidden_states=_bank()["prompt_embeds"][:2],
                      pooled_projections=_bank()["pooled_prompt_embeds"][:2], timestep=torch.tensor([900.0, 500.0]))
        with trainer.roles.use("student"):
            student = backend.model(**inputs, return_dict=False)[0]
        with trainer.roles.use("teacher"):
            teacher = backend.model(**inputs, return_dict=False)[0]
        assert (student - teacher).abs().max() > 1e-4  # the LoRA moved
        fresh = SD3Transformer2DModel(**VARIANTS[variant]).eval()
        fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in backend.model.state_dict().items()
                               if "lora_" not in k}, strict=False)
        fresh.load_lora_adapter(str(tmp_path), weight_name=files[0].name, prefix="transformer")
        torch.testing.assert_close(fresh(**inputs, return_dict=False)[0], student, atol=1e-5, rtol=0)
