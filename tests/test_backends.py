"""PixArt-alpha and CogVideoX backends: x0 from their own parameterisation and schedule, a few
TDM steps, and a student LoRA that loads back (PixArt through peft, CogVideoX through diffusers)."""

import pytest
import torch

import peft  # noqa: F401
import diffusers

from safetensors.torch import load_file  # noqa: E402

from tdm_train import NoiseSchedule  # noqa: E402
from tdm_train.backends import CogVideoXBackend, PixArtBackend  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402
from tdm_train.training.roles import lora_config  # noqa: E402
from tdm_train.tiny_models import (  # noqa: E402
    COGVIDEOX_2B_SCHEDULER_CONFIG,
    PIXART_SCHEDULER_CONFIG,
    tiny_cogvideox_transformer,
    tiny_pixart_transformer,
)
from tdm_train.training.trainer import TDMTrainer, TrainConfig  # noqa: E402


def _pixart(sample_size=8):
    negative = {"prompt_embeds": torch.zeros(1, 6, 32), "prompt_attention_mask": torch.tensor([[1, 1, 0, 0, 0, 0]])}
    return PixArtBackend(tiny_pixart_transformer(sample_size), PIXART_SCHEDULER_CONFIG, negative,
                         resolution=64 if sample_size == 8 else 128)


def _pixart_bank(n=4):
    gen = torch.Generator().manual_seed(0)
    return {"prompt_embeds": torch.randn(n, 6, 32, generator=gen), "prompt_attention_mask": torch.ones(n, 6, dtype=torch.long)}


def _cogvideox():
    return CogVideoXBackend(tiny_cogvideox_transformer(), COGVIDEOX_2B_SCHEDULER_CONFIG,
                            {"prompt_embeds": torch.zeros(1, 16, 32)}, height=16, width=16, frames=9)


def _config(tmp_path, **kw):
    return TrainConfig(output_dir=str(tmp_path), max_train_steps=2, train_batch_size=2, learning_rate=1e-3,
                       lora_rank=4, lora_alpha=2, checkpointing_steps=2, **kw)


@pytest.mark.parametrize("sample_size", [8, 128])
def test_pixart_x0_uses_the_eps_half_and_its_schedule(sample_size):
    backend = _pixart(sample_size)
    cond = {k: v[:2] for k, v in _pixart_bank().items()}
    x = torch.randn(backend.latent_shape(2))
    t = torch.tensor([899, 224])
    raw = backend.model(x, encoder_hidden_states=cond["prompt_embeds"], encoder_attention_mask=cond["prompt_attention_mask"],
                        timestep=t, added_cond_kwargs=None if sample_size == 8 else {
                            "resolution": torch.tensor([[x.shape[2] * 8.0, x.shape[3] * 8.0]]).repeat(2, 1),
                            "aspect_ratio": torch.ones(2, 1)}, return_dict=False)[0]
    assert raw.shape[1] == 8 and backend.learned_sigma and backend.micro_conditions == (sample_size == 128)
    expected = NoiseSchedule.from_diffusers_config(PIXART_SCHEDULER_CONFIG).x0_from_output(raw[:, :4], x, t)
    torch.testing.assert_close(backend.x0(x, t, cond), expected)
    uncond = backend.unconditional(cond)
    assert uncond["prompt_embeds"].shape == cond["prompt_embeds"].shape
    assert uncond["prompt_attention_mask"][0].tolist() == [1, 1, 0, 0, 0, 0]  # T5("") with its mask, not zeros


def test_pixart_trains_and_its_lora_loads_through_peft(tmp_path):
    from peft import inject_adapter_in_model
    from peft.functional import set_peft_model_state_dict

    torch.manual_seed(0)
    trainer = TDMTrainer(_pixart(), _pixart_bank(), _config(tmp_path, tdm=TDMConfig(guidance_scale=3.5)))
    summary = trainer.train(progress=False)
    assert summary["nonfinite_total"] == 0
    comfy = load_file(str(tmp_path / "tdm_lora_comfyui.safetensors"))
    assert all(k.startswith("transformer.") for k in comfy)
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {2.0}
    # diffusers' PixArt has no LoRA loader: load the diffusers file through peft on a fresh model
    fresh = tiny_pixart_transformer()
    inject_adapter_in_model(lora_config(4, 2, ("to_q", "to_k", "to_v", "to_out.0")), fresh, adapter_name="tdm")
    state = {k.removeprefix("transformer."): v for k, v in
             load_file(str(tmp_path / "pytorch_lora_weights.safetensors")).items()}
    result = set_peft_model_state_dict(fresh, state, adapter_name="tdm")
    assert not result.unexpected_keys
    backend = _pixart()
    cond = {k: v[:2] for k, v in _pixart_bank().items()}
    x, t = torch.randn(backend.latent_shape(2)), torch.tensor([674, 449])
    backend.model = fresh
    with torch.no_grad(), trainer.roles.use("student"):
        torch.testing.assert_close(backend.x0(x, t, cond), trainer.backend.x0(x, t, cond), rtol=1e-4, atol=1e-5)


def test_cogvideox_x0_is_finite_at_t999_and_trains(tmp_path):
    backend = _cogvideox()
    cond = {"prompt_embeds": torch.randn(2, 16, 32)}
    x = torch.randn(backend.latent_shape(2))
    assert x.shape == (2, 3, 4, 2, 2)  # [B, F, C, H, W]
    x0 = backend.x0(x, torch.tensor([999, 999]), cond)
    v = backend.model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"], timestep=torch.tensor([999, 999]),
                      return_dict=False)[0]
    torch.testing.assert_close(x0, -v)  # alpha_999 = 0: x0 = -v exactly
    torch.manual_seed(0)
    trainer = TDMTrainer(_cogvideox(), {"prompt_embeds": torch.randn(4, 16, 32)},
                         _config(tmp_path, tdm=TDMConfig(timesteps=(999, 856, 665, 399), guidance_scale=6.0)))
    assert trainer.objective.timesteps == [999, 856, 665, 399]
    assert trainer.train(progress=False)["nonfinite_total"] == 0
    # the diffusers file loads into a fresh CogVideoX transformer with every module
    pipeline = diffusers.CogVideoXPipeline
    fresh = tiny_cogvideox_transformer()
    lora_state, metadata = pipeline.lora_state_dict(str(tmp_path / "pytorch_lora_weights.safetensors"),
                                                    return_lora_metadata=True)
    pipeline.load_lora_into_transformer(lora_state, transformer=fresh, adapter_name="tdm", metadata=metadata)
    loaded = [n for n, m in fresh.named_modules() if hasattr(m, "lora_A") and "tdm" in m.lora_A]
    assert len(loaded) == len(trainer.roles.state_dict("student")) // 2
    new = CogVideoXBackend(fresh, COGVIDEOX_2B_SCHEDULER_CONFIG, {"prompt_embeds": torch.zeros(1, 16, 32)},
                           height=16, width=16, frames=9)
    t = torch.tensor([856, 399])
    with torch.no_grad(), trainer.roles.use("student"):
        torch.testing.assert_close(new.x0(x, t, cond), trainer.backend.x0(x, t, cond), rtol=1e-4, atol=1e-5)


def test_cogvideox_rejects_other_prediction_types_and_rotary_models():
    with pytest.raises(ValueError, match="v_prediction"):
        CogVideoXBackend(tiny_cogvideox_transformer(), {**COGVIDEOX_2B_SCHEDULER_CONFIG, "prediction_type": "epsilon"},
                         {"prompt_embeds": torch.zeros(1, 16, 32)})
    model = tiny_cogvideox_transformer()
    model.register_to_config(use_rotary_positional_embeddings=True)
    with pytest.raises(ValueError, match="CogVideoX-2B"):
        CogVideoXBackend(model, COGVIDEOX_2B_SCHEDULER_CONFIG, {"prompt_embeds": torch.zeros(1, 16, 32)})
