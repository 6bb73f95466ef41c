"""TDM-unify students in the nodes, over the ComfyUI test doubles: the step condition the TDM LoRA
Loader puts on a MODEL (an apply_model wrapper) adds c_K for K = what the TDM samplers say, for
one call only; untrained K are refused; a sampler that says nothing gets the largest K and a
warning. The same through real ComfyUI: tests/test_comfyui_integration.py (check_unify_in_comfy)."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import submodule
from torch import nn

from tdm_train.lora.step_embedding import StepConditions

STEPS = (1, 2, 4)


class TinyUNet(nn.Module):
    """ComfyUI's UNet layout where it matters: time_embed = Sequential(Linear, SiLU, Linear)."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.time_embed(x))


class BaseModel:
    def __init__(self):
        self.diffusion_model = TinyUNet()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x)


def _conditions():
    generator = torch.Generator().manual_seed(0)
    return StepConditions.for_family("sd15", {k: torch.randn(8, generator=generator) for k in STEPS})


def _call(stubs, base, wrappers, transformer_options):
    """What ComfyUI's BaseModel.apply_model does with its APPLY_MODEL wrappers."""
    executor = stubs["comfy.patcher_extension"].WrapperExecutor.new_class_executor(base.apply_model, base, wrappers)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    return executor.execute(x, torch.ones(2), None, None, None, transformer_options)


@pytest.fixture
def unify(pack):
    return submodule(pack, "step_condition")


def test_wrapper_adds_c_k_for_the_call_only_and_refuses_an_untrained_k(stubs, unify):
    base, conditions = BaseModel(), _conditions()
    wrapper = unify.StepConditionWrapper(conditions, "unify.safetensors")
    wrapper.check(base.diffusion_model)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    for k in STEPS:
        got = _call(stubs, base, [wrapper], {unify.NUM_STEPS_OPTION: k})
        expected = base.diffusion_model.out(base.diffusion_model.time_embed(x) + conditions.vector(k))
        assert torch.allclose(got, expected, atol=1e-6), k
        assert not base.diffusion_model.time_embed[2]._forward_hooks  # removed when the call returned
    assert not torch.allclose(_call(stubs, base, [wrapper], {unify.NUM_STEPS_OPTION: 2}), base.diffusion_model(x))
    with pytest.raises(ValueError, match=r"trained for \[1, 2, 4\] steps, not 3"):
        _call(stubs, base, [wrapper], {unify.NUM_STEPS_OPTION: 3})
    assert not base.diffusion_model.time_embed[2]._forward_hooks


def test_unknown_k_runs_as_the_largest_trained_k_with_one_warning_per_run(stubs, unify, caplog):
    base, conditions = BaseModel(), _conditions()
    wrapper = unify.StepConditionWrapper(conditions, "unify.safetensors")
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    run = {"sample_sigmas": torch.tensor([8.3, 1.4, 0.0])}
    with caplog.at_level(logging.WARNING):
        first = _call(stubs, base, [wrapper], dict(run))
        _call(stubs, base, [wrapper], dict(run))  # the same sampling run: no second warning
        _call(stubs, base, [wrapper], {"sample_sigmas": torch.tensor([1.0, 0.0])})  # another run
    assert torch.allclose(first, base.diffusion_model.out(base.diffusion_model.time_embed(x) + conditions.vector(4)))
    warnings = [r.getMessage() for r in caplog.records if "does not say its step count" in r.getMessage()]
    assert len(warnings) == 2 and "running it as the 4-step student" in warnings[0]


def test_condition_for_another_model_is_refused_at_load_time(unify):
    wide = StepConditions.for_family("sd15", {2: torch.ones(16)})
    with pytest.raises(ValueError, match="width 16 for time_embed.2 of width 8"):
        unify.StepConditionWrapper(wide, "x").check(BaseModel().diffusion_model)
    with pytest.raises(ValueError, match="names no ComfyUI layer"):
        unify.StepConditionWrapper(StepConditions.for_family("cogvideox", {2: torch.ones(8)}), "x")
    with pytest.raises(ValueError, match="does not have"):
        unify.StepConditionWrapper(StepConditions.for_family("pixart", {2: torch.ones(8)}), "x").check(TinyUNet())


def _extra_args(wrapper=None):
    wrappers = {"apply_model": {"tdm_step_condition": [wrapper]}} if wrapper is not None else {}
    return {"model_options": {"transformer_options": {"wrappers": wrappers, "patches": {}}}, "seed": 1}


def test_with_num_steps_copies_and_refuses_untrained_k_before_the_first_step(unify):
    wrapper = unify.StepConditionWrapper(_conditions(), "unify.safetensors")
    extra = _extra_args(wrapper)
    out = unify.with_num_steps(extra, 2)
    assert out["model_options"]["transformer_options"][unify.NUM_STEPS_OPTION] == 2
    assert unify.NUM_STEPS_OPTION not in extra["model_options"]["transformer_options"]  # caller's dicts untouched
    assert out["seed"] == 1 and out["model_options"]["transformer_options"]["wrappers"] is extra["model_options"][
        "transformer_options"]["wrappers"]
    with pytest.raises(ValueError, match=r"trained for \[1, 2, 4\]"):
        unify.with_num_steps(extra, 3)
    assert unify.with_num_steps(_extra_args(), 3)["model_options"]["transformer_options"][unify.NUM_STEPS_OPTION] == 3


def test_engine_of_one_k_refuses_a_tdm_sampler_of_another(stubs, unify, caplog):
    base = BaseModel()
    wrapper = unify.FixedStepsWrapper(2, [1, 2, 4], "student/model.opt.onnx")
    assert torch.allclose(_call(stubs, base, [wrapper], {unify.NUM_STEPS_OPTION: 2}),
                          base.diffusion_model(torch.linspace(-1, 1, 8).reshape(2, 4)))
    with pytest.raises(ValueError, match="exported for 2 sampling steps.*not 4"):
        unify.with_num_steps(_extra_args(wrapper), 4)
    with caplog.at_level(logging.WARNING):
        _call(stubs, base, [wrapper], {"sample_sigmas": torch.tensor([1.0, 0.0])})
    assert any("does not say its step count" in r.getMessage() for r in caplog.records)


class _Model:
    """The KSamplerX0Inpaint a sampler function is handed: records the K each call carries."""

    def __init__(self, stubs):
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(
            model_sampling=stubs["comfy.model_sampling"].ModelSamplingDiscrete()))
        self.seen = []

    def __call__(self, x, sigma, model_options=None, seed=None):
        self.seen.append(model_options["transformer_options"].get("tdm_num_steps"))
        return torch.zeros_like(x)


def test_tdm_sampler_tells_the_model_the_steps_it_samples_or_the_k_it_is_given(pack, stubs):
    sampling = submodule(pack, "sampling")
    sigmas = torch.tensor([8.3028, 1.3672, 0.0])  # 2 steps
    model = _Model(stubs)
    sampling.tdm_sampler_function(model, torch.randn(1, 4, 2, 2), sigmas, _extra_args(), disable=True)
    assert model.seen == [2, 2]
    model = _Model(stubs)  # the TDM KSampler's img2img: 2 points left of the 4-step grid
    sampler = sampling.tdm_sampler(0.0, num_steps=4)
    assert sampler.extra_options == {"eta": 0.0, "num_steps": 4}
    sampler.sampler_function(model, torch.randn(1, 4, 2, 2), sigmas, _extra_args(), disable=True,
                             **sampler.extra_options)
    assert model.seen == [4, 4]


def test_cogvideox_nodes_sample_a_unify_lora_as_the_k_of_their_grid(pack, stubs, tmp_path, monkeypatch):
    """TDM CogVideoX LoRA keeps a unify LoRA's condition on the pipeline; the sampler applies c_K for
    K = its grid's length (the same video as the plain LoRA with the library's c_K hook), refuses an
    untrained K, and leaves no hook behind (and applies c_K once where tdm_train's pipeline does it
    too: branch unify)."""
    from export_helpers import tiny_student
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tdm_train.lora.step_embedding import applied
    from tdm_train.pipelines.cogvideox import CogVideoXParts

    cogvideox = submodule(pack, "cogvideox")
    pipeline_dir, lora_dir = tiny_student(tmp_path, "cogvideox")
    parts = CogVideoXParts.load(pipeline_dir, "fp32")
    plain = lora_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(plain), "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    target = parts.transformer.time_embedding.linear_2
    generator = torch.Generator().manual_seed(1)
    conditions = StepConditions.for_family("cogvideox", {k: torch.randn(target.out_features, generator=generator)
                                                         for k in (2, 4)})
    save_file({**state, **conditions.tensors()}, str(tmp_path / "unify.safetensors"),
              metadata={**metadata, **conditions.metadata()})
    files = {"unify.safetensors": str(tmp_path / "unify.safetensors"), "plain.safetensors": str(plain)}
    monkeypatch.setattr(stubs["folder_paths"], "get_full_path_or_raise", lambda folder, name: files[name],
                        raising=False)

    loaded = cogvideox.ComfyCogVideoX(parts, {})
    out = cogvideox.TDMCogVideoXLoRA.execute(loaded, "unify.safetensors", "recorded", 1.0, True)
    unify = out.args[0]
    assert loaded.step_condition is None and loaded.parts.loras == ()  # the loaded pipeline is unchanged
    assert "TDM-unify student" in out.ui.value  # the node's line, or the pipeline's once it applies it itself
    plain_pipeline = cogvideox.TDMCogVideoXLoRA.execute(loaded, "plain.safetensors", "recorded", 1.0, True).args[0]
    assert plain_pipeline.step_condition is None

    embeds = parts.encode(["a red cat"])
    size = dict(seed=2, frames=9, height=16, width=16)
    for grid in ([999, 665], [999, 856, 665, 399]):
        got = cogvideox.sample_video(unify, embeds, None, grid, **size)
        with applied(parts.transformer, conditions, len(grid)):
            reference = plain_pipeline.parts.sample(embeds, None, timesteps=grid, **size)
        without = plain_pipeline.parts.sample(embeds, None, timesteps=grid, **size)
        assert torch.allclose(got, reference, atol=1e-6), grid
        assert (got - without).abs().max() > 1e-4  # c_K changed the video
        assert not target._forward_hooks
    with pytest.raises(ValueError, match=r"trained for (K = )?\[2, 4\] steps[;,]"):
        cogvideox.sample_video(unify, embeds, None, [999, 665, 399], **size)
    assert not target._forward_hooks


def test_img2img_through_the_tdm_sampler_on_a_unify_student_warns_about_the_cut_grid(pack, stubs, caplog):
    sampling = submodule(pack, "sampling")
    wrapper = submodule(pack, "step_condition").StepConditionWrapper(_conditions(), "unify.safetensors")
    model_wrap = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=SimpleNamespace(sigma_max=14.6)))
    sigmas, noise, image = torch.tensor([1.3672, 0.6299, 0.0]), torch.randn(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    with caplog.at_level(logging.WARNING):
        sampling.tdm_sampler(0.0).sample(model_wrap, sigmas, _extra_args(wrapper), None, noise, latent_image=image)
        sampling.tdm_sampler(0.0, num_steps=4).sample(model_wrap, sigmas, _extra_args(wrapper), None, noise,
                                                      latent_image=image)  # the TDM KSampler: K is known
        sampling.tdm_sampler(0.0).sample(model_wrap, sigmas, _extra_args(), None, noise, latent_image=image)
    warnings = [r.getMessage() for r in caplog.records if "img2img on a TDM-unify student" in r.getMessage()]
    assert len(warnings) == 1 and "conditioned on K = 2" in warnings[0]
