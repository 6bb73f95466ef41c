"""CogVideoX-2B with TDM outside ComfyUI (what the CogVideoX nodes run): a tiny random-weight
folder loads, LoRAs apply fused or not without touching the loaded weights, the sampler runs the
trained grid with the exact x0 at t = 999, and the VAE decodes 4k+1 frames; the clear errors."""

import copy

import pytest
import torch
from export_helpers import random_student_lora, tiny_student
from conftest import submodule as _submodule

from tdm_train.pipelines.cogvideox import CogVideoXParts, check_frames
from tdm_train.lora.export import save_student_lora

SIZE = dict(frames=9, height=16, width=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cog")
    pipeline, lora = tiny_student(root, "cogvideox")
    parts = CogVideoXParts.load(pipeline, "fp32")
    return root, parts, lora / "pytorch_lora_weights.safetensors"


def _embeds(parts):
    return parts.encode(["a red cat riding a horse"])


def test_sampling_runs_the_trained_grid_with_the_exact_x0_at_t_999(tiny):
    _, parts, _ = tiny
    seen, raw = [], []

    def record(module, args, kwargs, out):  # returns None: the output is left as it is
        seen.append(kwargs["timestep"].tolist())
        raw.append(out[0])

    handle = parts.transformer.register_forward_hook(record, with_kwargs=True)
    x0s = []
    try:
        latents = parts.sample(_embeds(parts), seed=3, callback=lambda step, x0: x0s.append(x0), **SIZE)
    finally:
        handle.remove()
    assert seen == [[999], [856], [665], [399]]
    assert latents.shape == (1, 3, 4, 2, 2) and torch.isfinite(latents).all()
    # alpha = 0 at t = 999 on the zero-terminal-SNR schedule: x0 = alpha x - sigma v = -v exactly
    assert torch.equal(x0s[0], -raw[0].float())
    torch.testing.assert_close(latents, x0s[-1])
    assert torch.equal(parts.sample(_embeds(parts), seed=3, **SIZE), latents)  # seeded


def test_lora_fused_or_not_gives_the_same_video_and_leaves_the_weights_as_loaded(tiny):
    _, parts, lora = tiny
    before = copy.deepcopy(parts.transformer.state_dict())
    base = parts.sample(_embeds(parts), seed=1, **SIZE)
    fused = parts.with_lora(lora, fuse=True)
    hooked = parts.with_lora(lora, fuse=False)
    assert parts.loras == () and len(fused.loras) == 1  # the loaded pipeline is unchanged
    with_fused = fused.sample(_embeds(parts), seed=1, **SIZE)
    with_hooks = hooked.sample(_embeds(parts), seed=1, **SIZE)
    torch.testing.assert_close(with_fused, with_hooks, atol=1e-5, rtol=1e-5)
    assert (with_fused - base).abs().max() > 1e-4  # the LoRA does something
    after = parts.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored exactly
    assert torch.equal(parts.sample(_embeds(parts), seed=1, **SIZE), base)
    zero = parts.with_lora(lora, strength=0.0)
    assert torch.equal(zero.sample(_embeds(parts), seed=1, **SIZE), base)
    assert fused.lora_report() == ["pytorch_lora_weights.safetensors: strength 1 (metadata tdm.lora_strength), "
                                   "4 modules, fused"]


def test_loras_for_another_model_are_refused_or_reported(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, parts, lora = tiny
    from diffusers import CogVideoXTransformer3DModel

    other = CogVideoXTransformer3DModel(  # a wider CogVideoX (6 heads instead of 4), as 5B is to 2Bnum_attention_heads=6, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_width=2,
                                        sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=16)
    paths = save_student_lora(tmp_path / "wide", "cogvideox", random_student_lora(other), 4, 2.0,
                              ("to_q",), [999, 856, 665, 399], 1)
    with pytest.raises(ValueError, match="does not fit this CogVideoX with inner dim 32.*another CogVideoX"):
        parts.with_lora(paths[0])
    _, sdxl_lora = tiny_student(tmp_path / "sdxl", "sdxl")
    with pytest.raises(ValueError, match="is not a LoRA for this.*matched no weight"):
        parts.with_lora(sdxl_lora / "pytorch_lora_weights.safetensors")
    state = load_file(str(lora))
    state["transformer.not_a_module.lora_A.weight"] = torch.zeros(4, 8)
    state["transformer.not_a_module.lora_B.weight"] = torch.zeros(8, 4)
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    report = parts.with_lora(partial, strength=0.5).lora_report()[0]
    assert "strength 0.5 (given)" in report and "WARNING: 1 of 5 LoRA keys matched no weight" in report


def test_decode_gives_4k_plus_1_frames_in_comfyuis_image_layout(tiny):
    _, parts, _ = tiny
    latents = parts.sample(_embeds(parts), seed=0, **SIZE)
    for tiling in (False, True):
        frames = parts.decode(latents, tiling=tiling, slicing=True)
        assert frames.shape == (9, 16, 16, 3) and 0 <= frames.min() and frames.max() <= 1


def test_bad_inputs_get_clear_errors(tiny, tmp_path):
    root, parts, _ = tiny
    assert check_frames(49) == 49
    with pytest.raises(ValueError, match="4k\\+1"):
        check_frames(48)
    with pytest.raises(ValueError, match="multiples of 16"):
        parts.sample(_embeds(parts), frames=9, height=24, width=16)
    with pytest.raises(ValueError, match="cfg > 1 needs a negative"):
        parts.sample(_embeds(parts), cfg=2.0, **SIZE)
    negative = parts.encode([""])
    assert parts.sample(_embeds(parts), negative, cfg=2.0, **SIZE).isfinite().all()
    sdxl_folder, _ = tiny_student(tmp_path / "x", "sdxl")
    with pytest.raises(ValueError, match="is not a CogVideoX diffusers folder.*StableDiffusionXLPipeline"):
        CogVideoXParts.load(sdxl_folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    with pytest.raises(FileNotFoundError, match="lacks transformer, vae"):
        CogVideoXParts.load(broken)
    assert not parts.rotary


def test_nodes_list_folders_and_grids(pack, stubs, tmp_path, monkeypatch, tiny):
    root, _, _ = tiny
    cogvideox = _submodule(pack, "cogvideox")
    folder_paths = stubs["folder_paths"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "CogVideo", ([str(root)], set()))
    assert cogvideox.model_folders() == ["pipeline"]
    assert cogvideox._folder_path("pipeline") == (root / "pipeline").resolve()
    with pytest.raises(FileNotFoundError, match="no diffusers folder"):
        cogvideox._folder_path("../outside")
    assert cogvideox.sampling_grid("cogvideox", 4, "") == [999, 856, 665, 399]
    assert cogvideox.sampling_grid("tdm_uniform", 4, "") == [999, 749, 499, 249]
    assert cogvideox.sampling_grid("custom", 4, "999, 700, 300") == [999, 700, 300]


def test_a_unify_lora_is_sampled_with_the_condition_of_its_k_fused_or_hooked(tiny, tmp_path):
    """A TDM-unify student's K condition travels in its file: sampled with K steps, c_K is added to
    the timestep embedding's last Linear (as the trainer's student was told K); an untrained K is refused."""
    from safetensors.torch import load_file

    from tdm_train.lora.step_embedding import StepConditions

    _, parts, lora = tiny
    dim = parts.transformer.time_embedding.linear_2.out_features
    gen = torch.Generator().manual_seed(5)
    conditions = StepConditions.for_family("cogvideox", {k: torch.randn(dim, generator=gen) for k in (1, 2, 4)})
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(lora)).items()}
    paths = save_student_lora(tmp_path / "unify", "cogvideox", state, 4, 2.0, ("to_q", "to_k", "to_v", "to_out.0"),
                              [999, 749, 499, 249], 1, step_conditions=conditions)
    plain = parts.with_lora(lora)
    grid2 = [999, 499]
    for fuse in (True, False):
        unify = parts.with_lora(paths[0], fuse=fuse)
        assert unify.loras[0].step_conditions.steps == [1, 2, 4]
        assert "TDM-unify student" in unify.lora_report()[0]
        got = unify.sample(_embeds(parts), seed=2, timesteps=grid2, **SIZE)
        # the same with c_2 added by hand to the plain LoRA's timestep embedding
        handle = parts.transformer.time_embedding.linear_2.register_forward_hook(
            lambda module, inputs, output: output + conditions.vector(2).to(output.dtype))
        try:
            expected = plain.sample(_embeds(parts), seed=2, timesteps=grid2, **SIZE)
        finally:
            handle.remove()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (got - plain.sample(_embeds(parts), seed=2, timesteps=grid2, **SIZE)).abs().max() > 1e-4
        with pytest.raises(ValueError, match="trained for \\[1, 2, 4\\] steps, not 3"):
            unify.sample(_embeds(parts), seed=2, timesteps=[999, 666, 333], **SIZE)
    assert not parts.transformer.time_embedding.linear_2._forward_hooks  # nothing left behind
    from tdm_train.lora.step_embedding import StepConditions as SC

    assert SC.read(paths[1]).steps == [1, 2, 4]  # the ComfyUI file carries it too
