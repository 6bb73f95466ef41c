"""A TDM-unify student's step condition in its files: round trip, applied by a hook == folded into
the bias, untrained K and half-written files refused, and the plain LoRA readers skip it."""

import json

import pytest
import torch
from torch import nn

from tdm_train.atomic import save_safetensors
from tdm_train.lora import step_embedding as se
from tdm_train.lora.merge import read_lora
from tdm_train.tiny_models import tiny_sdxl_unet


def _conditions(dim: int, steps=(1, 2, 4)) -> se.StepConditions:
    gen = torch.Generator().manual_seed(0)
    return se.StepConditions.for_family("sdxl", {k: torch.randn(dim, generator=gen) for k in steps})


def _unet_inputs(unet):
    gen = torch.Generator().manual_seed(1)
    cfg = unet.config
    x = torch.randn(2, 4, 8, 8, generator=gen)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 7, cfg.cross_attention_dim, generator=gen),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=gen),
                                     "time_ids": torch.randn(2, 6, generator=gen)})
    return x, torch.tensor([899, 449]), kwargs


def test_the_sdxl_target_is_the_output_linear_of_the_time_embedding():
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    assert se.output_linear(unet, "time_embedding") == se.TARGETS["sdxl"][0]


def test_hook_equals_folded_bias_and_is_removed_afterwards():
    torch.manual_seed(0)
    unet = tiny_sdxl_unet().eval()
    dim = unet.get_submodule(se.TARGETS["sdxl"][0]).out_features
    conditions = _conditions(dim)
    x, t, kwargs = _unet_inputs(unet)
    with torch.no_grad():
        plain = unet(x, t, **kwargs).sample
        with se.applied(unet, conditions, 2):
            hooked = unet(x, t, **kwargs).sample
        after = unet(x, t, **kwargs).sample
        se.fold_into_bias(unet, conditions, 2)
        folded = unet(x, t, **kwargs).sample
    assert (hooked - plain).abs().max() > 1e-3  # the condition changes the output
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # the hook is gone
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-6)


def test_untrained_step_count_is_refused_with_the_trained_ones():
    conditions = _conditions(8)
    with pytest.raises(ValueError, match=r"trained for \[1, 2, 4\] steps, not 3"):
        conditions.vector(3)


def test_file_round_trip_and_plain_readers_skip_the_condition(tmp_path):
    conditions = _conditions(8)
    lora = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_a.alpha": torch.tensor(2.0)}
    path = tmp_path / "unify.safetensors"
    save_safetensors({**lora, **conditions.tensors()}, path, {"tdm.num_steps": "4", **conditions.metadata()})
    back = se.StepConditions.read(path)
    assert back.steps == [1, 2, 4] and back.target == "time_embedding.linear_2" and back.comfy_target == "time_embed.2"
    for k in (1, 2, 4):
        torch.testing.assert_close(back.vector(k), conditions.vector(k), rtol=0, atol=0)
    layers, _ = read_lora(path)
    assert list(layers) == ["lora_unet_a"]
    assert se.StepConditions.read(tmp_path / "unify.safetensors") is not None
    plain = tmp_path / "plain.safetensors"
    save_safetensors(lora, plain, {})
    assert se.StepConditions.read(plain) is None


def test_half_a_condition_is_a_broken_file():
    conditions = _conditions(8)
    with pytest.raises(ValueError, match="without the other half"):
        se.StepConditions.from_state(conditions.tensors(), {}, "x.safetensors")
    with pytest.raises(ValueError, match="without the other half"):
        se.StepConditions.from_state({}, conditions.metadata(), "x.safetensors")
    meta = json.loads(conditions.metadata()[se.METADATA_KEY])
    meta["steps"] = [1, 2]
    with pytest.raises(ValueError, match="metadata lists"):
        se.StepConditions.from_state(conditions.tensors(), {se.METADATA_KEY: json.dumps(meta)}, "x.safetensors")


def test_wrong_architecture_and_width_are_refused():
    model = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(ValueError, match="does not have"):
        with se.applied(model, _conditions(8), 4):
            pass
    with pytest.raises(ValueError, match="width 6"):
        with se.applied(model, _conditions(6), 4, path="0"):
            pass


def test_non_finite_vectors_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        se.StepConditions("t", {4: torch.tensor([float("nan"), 0.0])})
