"""Fusing a LoRA file into a diffusers model's weights (``tdm_train.lora.merge``) gives what
diffusers / peft compute with the adapter loaded, in every file format the exporter writes, at
the recorded or given strength, and refuses files that do not fit without touching the model."""

import copy
import json
import pickle

import pytest
import torch

import peft  # noqa: F401
import diffusers

from export_helpers import ALPHA, RANK, TARGETS, TIMESTEPS, random_student_lora  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tdm_train.lora.export import save_student_lora  # noqa: E402
from tdm_train.lora.merge import fuse_lora, read_lora  # noqa: E402
from tdm_train.lora.metadata import STRENGTH_KEY  # noqa: E402
from tdm_train.training.roles import lora_config  # noqa: E402
from tdm_train.tiny_models import (  # noqa: E402
    tiny_cogvideox_transformer,
    tiny_pixart_transformer,
    tiny_sdxl_conditioning,
    tiny_sdxl_unet,
)

SCALE = ALPHA / RANK  # 0.5: a merge that ignores alpha / rank is off by 2x
assert SCALE != 1.0


# ----------------------------------------------------------------------------- helpers
def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed by a refused LoRA: {changed[:4]}"


def _delta(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v - base[k] for k, v in model.state_dict().items()}


def _module_weight(model: torch.nn.Module, module: str) -> torch.Tensor:
    return model.get_submodule(module).weight.detach()


def _by_hand(base: torch.nn.Module, state: dict, module: str) -> torch.Tensor:
    """W + (alpha / rank) * B @ A from the base weight and the peft-keyed LoRA tensors."""
    return _module_weight(base, module) + SCALE * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]


def _sdxl_out(unet, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([899, 449]), **tiny_sdxl_conditioning(2, seed)).sample


def _pixart_out(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 32, generator=gen)
    with torch.no_grad():
        return model(x, encoder_hidden_states=text, timestep=torch.tensor([674, 449]), added_cond_kwargs=None,
                     return_dict=False)[0]


def _cogvideox_out(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 3, 4, 2, 2, generator=gen), torch.randn(2, 16, 32, generator=gen)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([999, 449]),
                     return_dict=False)[0]


def _rewrite(source, target, tensors=None, metadata=None, **meta_changes):
    """Copies a safetensors file with (optionally) other tensors and changed metadata."""
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata() or {}) if metadata is None else dict(metadata)
    meta.update(meta_changes)
    save_file(load_file(str(source)) if tensors is None else tensors, str(target), meta)
    return target


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(base UNet, peft-keyed student state, diffusers file, kohya/ComfyUI file)."""
    base = tiny_sdxl_unet()
    state = random_student_lora(base, seed=1)
    diffusers_path, comfy_path = save_student_lora(tmp_path_factory.mktemp("sdxl"), "sdxl", state, RANK, ALPHA,
                                                   TARGETS, TIMESTEPS, 1)
    return base, state, diffusers_path, comfy_path


@pytest.fixture(scope="module")
def sdxl_fused(sdxl):
    base, _, diffusers_path, _ = sdxl
    unet = copy.deepcopy(base)
    fused = fuse_lora(unet, diffusers_path)
    return unet, fused


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    base = tiny_pixart_transformer()
    state = random_student_lora(base, seed=2)
    diffusers_path, comfy_path = save_student_lora(tmp_path_factory.mktemp("pixart"), "pixart", state, RANK, ALPHA,
                                                   TARGETS, TIMESTEPS, 1)
    return base, state, diffusers_path, comfy_path


# ----------------------------------------------------------------------------- 1. SDXL against diffusers
def test_sdxl_diffusers_file_fuses_to_what_diffusers_computes_with_the_adapter(sdxl, sdxl_fused):
    base, state, diffusers_path, _ = sdxl
    fused_unet, fused = sdxl_fused
    assert fused.modules == len(state) // 2

    reference = copy.deepcopy(base)  # diffusers' own loader, adapter active at scale 1
    pipeline = diffusers.StableDiffusionXLPipeline
    lora_state, alphas, metadata = pipeline.lora_state_dict(str(diffusers_path), return_lora_metadata=True)
    pipeline.load_lora_into_unet(lora_state, alphas, unet=reference, adapter_name="tdm", metadata=metadata)
    loaded = [m for m in reference.modules() if hasattr(m, "lora_A") and "tdm" in m.lora_A]
    assert len(loaded) == len(state) // 2 and all(m.scaling["tdm"] == SCALE for m in loaded)

    expected = _sdxl_out(reference)
    assert not torch.allclose(expected, _sdxl_out(base), atol=1e-4)  # the LoRA matters
    torch.testing.assert_close(_sdxl_out(fused_unet), expected, rtol=1e-4, atol=1e-5)


def test_sdxl_fused_weight_is_w_plus_alpha_over_rank_up_down(sdxl, sdxl_fused):
    base, state, _, _ = sdxl
    fused_unet, _ = sdxl_fused
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    expected = _by_hand(base, state, module)
    torch.testing.assert_close(_module_weight(fused_unet, module), expected, rtol=0, atol=1e-7)
    # modules the LoRA does not target are bit-identical
    untouched = "down_blocks.1.attentions.0.proj_in"
    assert torch.equal(_module_weight(fused_unet, untouched), _module_weight(base, untouched))


def test_sdxl_comfyui_kohya_file_fuses_like_the_diffusers_file(sdxl, sdxl_fused):
    base, state, _, comfy_path = sdxl
    fused_unet, _ = sdxl_fused
    with safe_open(str(comfy_path), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())  # really the kohya names
    unet = copy.deepcopy(base)
    fused = fuse_lora(unet, comfy_path)
    assert fused.modules == len(state) // 2 and fused.strength == 1.0
    expected = fused_unet.state_dict()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7, msg=key)

    # and diffusers' own kohya loader agrees on the outputs
    reference = copy.deepcopy(base)
    pipeline = diffusers.StableDiffusionXLPipeline
    lora_state, alphas = pipeline.lora_state_dict(str(comfy_path))
    pipeline.load_lora_into_unet(lora_state, alphas, unet=reference, adapter_name="tdm")
    torch.testing.assert_close(_sdxl_out(unet), _sdxl_out(reference), rtol=1e-4, atol=1e-5)


def test_kohya_conv_lora_fuses_with_its_kernel(tmp_path):
    """kohya's conv LoRA: down [r, in, kh, kw], up [out, r, 1, 1]."""
    unet = tiny_sdxl_unet()
    conv = unet.conv_in  # Conv2d(4, 32, 3)
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(32, 2, 1, 1, generator=gen)
    path = tmp_path / "conv.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
               "lora_unet_conv_in.alpha": torch.tensor(1.0)}, str(path))
    before = conv.weight.detach().clone()
    fuse_lora(unet, path)
    expected = before + 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 2. strength
def test_strength_comes_from_metadata_or_the_caller(sdxl, sdxl_fused, tmp_path):
    base, _, diffusers_path, _ = sdxl
    fused_unet, fused = sdxl_fused
    assert fused.strength == 1.0 and fused.strength_source == f"metadata {STRENGTH_KEY}"
    full = _delta(fused_unet, base.state_dict())
    assert any(d.abs().max() > 1e-3 for d in full.values())

    half_path = _rewrite(diffusers_path, tmp_path / "half.safetensors", **{STRENGTH_KEY: "0.5"})
    unet = copy.deepcopy(base)
    half = fuse_lora(unet, half_path)
    assert half.strength == 0.5 and half.strength_source == f"metadata {STRENGTH_KEY}"
    for key, value in _delta(unet, base.state_dict()).items():
        torch.testing.assert_close(value, 0.5 * full[key], rtol=0, atol=2e-8, msg=key)

    unet = copy.deepcopy(base)
    given = fuse_lora(unet, half_path, strength=2.0)  # the caller wins over the metadata
    assert given.strength == 2.0 and given.strength_source == "given"
    for key, value in _delta(unet, base.state_dict()).items():
        torch.testing.assert_close(value, 2.0 * full[key], rtol=0, atol=5e-8, msg=key)

    unet = copy.deepcopy(base)
    zero = fuse_lora(unet, diffusers_path, strength=0.0)
    assert zero.strength == 0.0 and zero.strength_source == "given"
    _assert_untouched(unet, base.state_dict())


def test_strength_without_metadata_is_one_or_the_known_release(sdxl, tmp_path):
    base, state, diffusers_path, _ = sdxl
    # peft keys and lora_adapter_metadata only: no tdm.* fields
    with safe_open(str(diffusers_path), "pt") as f:
        adapter = {"lora_adapter_metadata": f.metadata()["lora_adapter_metadata"]}
    plain = _rewrite(diffusers_path, tmp_path / "plain.safetensors", metadata=adapter)
    unet = copy.deepcopy(base)
    fused = fuse_lora(unet, plain)
    assert fused.strength == 1.0 and fused.strength_source.startswith("default 1.0")
    module = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v"
    expected = _by_hand(base, state, module)
    torch.testing.assert_close(_module_weight(unet, module), expected, rtol=0, atol=1e-7)

    release = _rewrite(diffusers_path, tmp_path / "tdm_sd3_lora.safetensors", metadata=adapter)
    fused = fuse_lora(copy.deepcopy(base), release)
    assert fused.strength == 0.125 and fused.strength_source.startswith("known release")

    with pytest.raises(ValueError, match="not a number"):
        fuse_lora(copy.deepcopy(base), _rewrite(diffusers_path, tmp_path / "bad.safetensors", **{STRENGTH_KEY: "x"}))


# ----------------------------------------------------------------------------- 3. PixArt against peft
def test_pixart_comfyui_file_fuses_to_what_peft_computes(pixart):
    from peft import inject_adapter_in_model
    from peft.functional import set_peft_model_state_dict

    base, state, _, comfy_path = pixart
    with safe_open(str(comfy_path), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("transformer.") for k in keys) and any(k.endswith(".alpha") for k in keys)

    model = copy.deepcopy(base)
    fused = fuse_lora(model, comfy_path)
    assert fused.modules == len(state) // 2

    reference = copy.deepcopy(base)
    inject_adapter_in_model(lora_config(RANK, ALPHA, TARGETS), reference, adapter_name="tdm")
    result = set_peft_model_state_dict(reference, state, adapter_name="tdm")
    assert not result.unexpected_keys
    expected = _pixart_out(reference)
    assert not torch.allclose(expected, _pixart_out(base), atol=1e-4)
    torch.testing.assert_close(_pixart_out(model), expected, rtol=1e-4, atol=1e-5)

    module = "transformer_blocks.1.attn2.to_out.0"
    by_hand = _by_hand(base, state, module)
    torch.testing.assert_close(_module_weight(model, module), by_hand, rtol=0, atol=1e-7)

    # the diffusers file (alpha in lora_adapter_metadata, no .alpha tensors) fuses the same weights
    other = copy.deepcopy(base)
    fuse_lora(other, pixart[2])
    torch.testing.assert_close(_module_weight(other, module), _module_weight(model, module), rtol=0, atol=0)


# ----------------------------------------------------------------------------- 4. CogVideoX
def test_cogvideox_diffusers_file_fuses(tmp_path):
    base = tiny_cogvideox_transformer()
    state = random_student_lora(base, seed=3)
    diffusers_path, comfy_path = save_student_lora(tmp_path, "cogvideox", state, RANK, ALPHA, TARGETS, TIMESTEPS, 1)
    # the second file (no ComfyUI core model) is the diffusers one again, alpha / rank included
    comfy_model = copy.deepcopy(base)
    fuse_lora(comfy_model, comfy_path)
    model = copy.deepcopy(base)
    fused = fuse_lora(model, diffusers_path)
    assert fused.modules == len(state) // 2 > 0
    assert json.loads(fused.metadata["tdm.timesteps"]) == TIMESTEPS
    assert not torch.allclose(_cogvideox_out(model), _cogvideox_out(base), atol=1e-4)
    module = "transformer_blocks.0.attn1.to_k"
    expected = _by_hand(base, state, module)
    torch.testing.assert_close(_module_weight(model, module), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(_module_weight(comfy_model, module), expected, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- peft configs beyond ours
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj_a, self.proj_b = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)

    def forward(self, x):
        return self.proj_b(torch.tanh(self.proj_a(x)))


@pytest.mark.parametrize("extra", [{"rank_pattern": {"proj_b": 2}}, {"use_rslora": True},
                                   {"rank_pattern": {"proj_b": 2}, "alpha_pattern": {"proj_b": 8.0}}],
                         ids=["rank_pattern", "rslora", "alpha_pattern"])
def test_diffusers_file_scale_follows_peft_for_other_configs(tmp_path, extra):
    """diffusers writes rank_pattern / alpha_pattern for adapters with mixed ranks / alphas: peft
    scales each module by its own alpha over its own rank (or sqrt(rank) with rslora)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.functional import set_peft_model_state_dict

    config = {"r": 4, "lora_alpha": 2.0, "target_modules": ["proj_a", "proj_b"], **extra}
    reference = _Toy()
    inject_adapter_in_model(LoraConfig(**config), reference, adapter_name="x")
    gen = torch.Generator().manual_seed(1)
    state = {}
    for name in ("proj_a", "proj_b"):
        layer = reference.get_submodule(name)
        state[f"{name}.lora_A.weight"] = torch.randn(layer.lora_A["x"].weight.shape, generator=gen)
        state[f"{name}.lora_B.weight"] = torch.randn(layer.lora_B["x"].weight.shape, generator=gen)
    assert not set_peft_model_state_dict(reference, state, adapter_name="x").unexpected_keys
    path = tmp_path / "lora.safetensors"
    save_file({f"transformer.{k}": v for k, v in state.items()}, str(path),
              {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})})
    model = _Toy()
    fuse_lora(model, path)
    x = torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 5. refusals
def test_sdxl_lora_into_pixart_lists_the_unmatched_keys_and_changes_nothing(sdxl):
    _, _, diffusers_path, comfy_path = sdxl
    model = tiny_pixart_transformer()
    before = _weights(model)
    for path in (diffusers_path, comfy_path):
        with pytest.raises(ValueError, match="matched no weight") as error:
            fuse_lora(model, path)
        names = sorted(read_lora(path)[0])
        assert names[0] in str(error.value) and f"{len(names)} of {len(names)}" in str(error.value)
        assert "PixArtTransformer2DModel" in str(error.value)
        _assert_untouched(model, before)


def test_one_unmatched_key_refuses_the_whole_file(sdxl, tmp_path):
    base, _, diffusers_path, _ = sdxl
    tensors = load_file(str(diffusers_path))
    tensors["unet.mid_block.not_a_module.lora_A.weight"] = torch.ones(RANK, 8)
    tensors["unet.mid_block.not_a_module.lora_B.weight"] = torch.ones(8, RANK)
    path = _rewrite(diffusers_path, tmp_path / "extra.safetensors", tensors)
    unet = copy.deepcopy(base)
    with pytest.raises(ValueError, match="matched no weight") as error:
        fuse_lora(unet, path)
    assert "unet.mid_block.not_a_module" in str(error.value) and "1 of " in str(error.value)
    _assert_untouched(unet, base.state_dict())


@pytest.mark.parametrize("broken", ["rank", "out", "in"])
def test_a_module_of_the_wrong_shape_is_refused_and_nothing_changes(sdxl, tmp_path, broken):
    base, _, diffusers_path, _ = sdxl
    tensors = load_file(str(diffusers_path))
    module = max(k.rsplit(".lora_", 1)[0] for k in tensors)  # the last one: every other module checks out first
    down, up = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    if broken == "rank":
        tensors[f"{module}.lora_B.weight"] = up[:, :RANK - 1].contiguous()
    elif broken == "out":
        tensors[f"{module}.lora_B.weight"] = torch.cat([up, up[:1]])
    else:
        tensors[f"{module}.lora_A.weight"] = torch.cat([down, down[:, :1]], dim=1)
    path = _rewrite(diffusers_path, tmp_path / f"{broken}.safetensors", tensors)
    unet = copy.deepcopy(base)
    with pytest.raises(ValueError, match="not fit") as error:
        fuse_lora(unet, path)
    assert module in str(error.value)
    _assert_untouched(unet, base.state_dict())


def test_a_transposed_lora_of_the_same_size_is_refused(tmp_path):
    """up [in, r] @ down [r, out] has as many elements as the [out, in] weight: still wrong."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16))
    before = _weights(model)
    path = tmp_path / "t.safetensors"
    save_file({"0.lora_A.weight": torch.ones(4, 16), "0.lora_B.weight": torch.ones(8, 4)}, str(path))
    with pytest.raises(ValueError, match="not fit"):
        fuse_lora(model, path)
    _assert_untouched(model, before)


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickle_files_that_would_run_code_are_refused_unexecuted(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(pickle.dumps({"x.lora_A.weight": _Tripwire(marker)}))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16))
    before = _weights(model)
    with pytest.raises(ValueError, match="not a safe format") as error:
        fuse_lora(model, path)
    assert "weights_only" not in str(error.value) and "was not executed" in str(error.value)
    assert not marker.exists()
    _assert_untouched(model, before)


def test_a_torch_saved_lora_is_read_weights_only_and_fuses_like_its_safetensors(tmp_path):
    """The official tdm_dreamshaper.pt is a torch.save'd state dict: read by the weights-only unpickler."""
    gen = torch.Generator().manual_seed(0)
    state = {"0.lora_A.weight": torch.randn(2, 8, generator=gen), "0.lora_B.weight": torch.randn(16, 2, generator=gen),
             "0.alpha": torch.tensor(4.0)}
    torch.save(state, tmp_path / "tdm_dreamshaper.pt")
    save_file(state, str(tmp_path / "same.safetensors"))
    from_pickle, from_safetensors = (torch.nn.Sequential(torch.nn.Linear(8, 16)) for _ in range(2))
    from_safetensors.load_state_dict(from_pickle.state_dict())
    fuse_lora(from_pickle, tmp_path / "tdm_dreamshaper.pt")
    fuse_lora(from_safetensors, tmp_path / "same.safetensors")
    assert torch.equal(from_pickle[0].weight, from_safetensors[0].weight)


def test_unreadable_files_are_refused(sdxl, tmp_path):
    _, _, diffusers_path, _ = sdxl
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8).numpy().tobytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(diffusers_path.read_bytes()[:-100])
    for path in (random_bytes, truncated):
        with pytest.raises(ValueError, match="not a readable safetensors"):
            read_lora(path)


def test_a_full_checkpoint_is_not_a_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(32, 4, 3, 3), "conv_in.bias": torch.zeros(32)}, str(path))
    with pytest.raises(ValueError, match="is not a LoRA weight"):
        fuse_lora(tiny_sdxl_unet(), path)


def test_a_module_with_only_down_is_refused(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_conv_in.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(ValueError, match="needs both down and up") as error:
        read_lora(path)
    assert "lora_unet_conv_in" in str(error.value)
