"""Export of tiny random-weight SDXL, PixArt-alpha and CogVideoX students to ONNX: folded,
checked on ONNX Runtime against PyTorch, described in engine.json, and sampled for 4 steps
through ONNX Runtime with the same result as PyTorch."""

import json

import pytest
import torch

import onnxruntime  # noqa: F401
import onnx_graphsurgeon  # noqa: F401

from export.families import ExportShapes, family_spec, sdxl_add_embeds  # noqa: E402
from export.generate import ExportedStudent  # noqa: E402
from export.manifest import load_manifest  # noqa: E402
from export.onnx_export import ExportFailed, export_onnx  # noqa: E402
from export.runtime import OnnxRuntimeRunner, ShapeOutsideProfile, TorchRunner, open_runner  # noqa: E402
from export.validate import Tolerance, ValidationFailed  # noqa: E402
from tdm_train.tiny_models import (  # noqa: E402
    COGVIDEOX_2B_SCHEDULER_CONFIG,
    PIXART_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    tiny_cogvideox_transformer,
    tiny_pixart_transformer,
    tiny_sdxl_unet,
)

GRID = [899, 674, 449, 224]
COG_GRID = [999, 856, 665, 399]
CASES = {
    "sdxl": (tiny_sdxl_unet, SDXL_SCHEDULER_CONFIG, GRID,
             ExportShapes(batch=(1, 1, 2), height=(8, 16, 16), width=(8, 16, 16), text_len=(8, 8, 16))),
    "pixart": (lambda: tiny_pixart_transformer(8), PIXART_SCHEDULER_CONFIG, GRID,
               ExportShapes(batch=(1, 1, 2), height=(8, 16, 16), width=(8, 16, 16), text_len=(16, 16, 16))),
    # 4x4 latents where the config says 2x2: the position table must be the export size's
    "cogvideox": (tiny_cogvideox_transformer, COGVIDEOX_2B_SCHEDULER_CONFIG, COG_GRID,
                  ExportShapes(batch=(1, 1, 2), height=(4, 4, 4), width=(4, 4, 4))),
}


def _export(tmp_path, family, dtype, **kwargs):
    make, scheduler, grid, shapes = CASES[family]
    spec = family_spec(family, make(), shapes, dtype)
    manifest = export_onnx(spec, tmp_path / f"{family}_{dtype}", dtype=dtype, shapes=shapes,
                           scheduler_config=scheduler, timesteps=grid, **kwargs)
    return manifest, tmp_path / f"{family}_{dtype}"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {(family, dtype): _export(root, family, dtype) for family in CASES for dtype in ("fp32", "fp16")}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", list(CASES))
def test_export_validates_on_onnx_runtime_within_the_dtypes_tolerance(exports, family, dtype):
    manifest, folder = exports[family, dtype]
    assert (folder / "model.onnx").is_file() and (folder / "model.opt.onnx").is_file()
    assert manifest.export["nodes_optimized"] < manifest.export["nodes_exported"]  # folding removed nodes
    cases = manifest.validation["cases"]
    assert manifest.validation["passed"] and all(c["passed"] for c in cases)
    # the CPU plan: opt, the smallest size at the largest batch, the largest size at batch 1 (repeats dropped)
    assert [c["shape"] for c in cases] == CASES[family][-1].bounded_points()
    assert manifest.validation["runtime"] == "onnxruntime-cpu" and manifest.validation["plan"].startswith("CPU")
    assert len(cases) == 2  # here the largest size is the opt size: opt, then batch 2 at the smallest size
    for case in cases:
        assert case["finite"]
        if dtype == "fp32":
            assert case["max_abs"] < 1e-4 and case["cosine"] > 0.99999
        else:  # fp16 network vs the fp32 model
            assert case["max_abs"] < 0.02 and case["cosine"] > 0.999 and case["max_abs"] > 1e-6


def test_engine_json_describes_inputs_profiles_family_and_schedule(exports):
    manifest, folder = exports["sdxl", "fp16"]
    data = json.loads((folder / "engine.json").read_text())
    assert data["format"] == "tdm-engine/1" and data["family"] == "sdxl" and data["signature"] == "diffusers"
    assert data["prediction_type"] == "epsilon" and data["timesteps"] == GRID and data["dtype"] == "fp16"
    inputs = {i["name"]: i for i in data["inputs"]}
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states", "add_embeds"]
    assert inputs["sample"] == {"name": "sample", "dtype": "float16", "shape": [-1, 4, -1, -1],
                                "profile": {"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [2, 4, 16, 16]}}
    assert inputs["timestep"]["dtype"] == "float32"  # schedule inputs stay fp32 in an fp16 network
    assert inputs["encoder_hidden_states"]["profile"]["max"] == [2, 16, 64]
    assert inputs["add_embeds"]["shape"] == [-1, 80]  # pooled 32 + 6 x 8 Fourier features (tiny SDXL)
    assert data["outputs"][0]["name"] == "model_output"
    assert data["export"]["exporter"] == "torchscript" and data["export"]["opset"] == 17
    assert data["export"]["dynamic_axes"]["sample"] == {"0": "batch", "2": "height", "3": "width"}
    assert data["conditioning"] == {"add_time_embed_dim": 8, "pooled_dim": 32, "add_embeds_dim": 80, "context_dim": 64}
    assert data["scheduler_config"] == SDXL_SCHEDULER_CONFIG
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(data["versions"])
    assert load_manifest(folder).inputs[0].profile == inputs["sample"]["profile"]

    cog, _ = exports["cogvideox", "fp32"]
    assert cog.input("sample").shape == [-1, 3, 4, 4, 4]  # frames, channels, height, width static
    assert cog.prediction_type == "v_prediction" and cog.timesteps == COG_GRID and cog.latent["frames"] == 3
    pixart, _ = exports["pixart", "fp32"]
    assert pixart.input_names == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]


@pytest.mark.parametrize("family,dtype", [("sdxl", "fp32"), ("sdxl", "fp16"), ("pixart", "fp32"),
                                          ("cogvideox", "fp32"), ("cogvideox", "fp16")])
def test_four_step_generation_on_onnx_runtime_equals_pytorch(exports, family, dtype):
    manifest, folder = exports[family, dtype]
    make, _, _, shapes = CASES[family]
    reference = TorchRunner(family_spec(family, make(), shapes, "fp32").module, manifest)
    runner = open_runner(folder, provider="cpu")
    assert isinstance(runner, OnnxRuntimeRunner)
    gen = torch.Generator().manual_seed(1)
    sample = manifest.input("sample").profile["opt"]
    text = manifest.input("encoder_hidden_states").profile["opt"]
    cond = {"prompt_embeds": torch.randn(1, *text[1:], generator=gen)}
    if family == "sdxl":
        cond.update(text_embeds=torch.randn(1, 32, generator=gen), time_ids=torch.tensor([[128.0, 128, 0, 0, 128, 128]]))
    if family == "pixart":
        cond["prompt_attention_mask"] = torch.ones(1, text[1])
    noise = torch.randn(sample, generator=gen)
    expected = ExportedStudent(reference).generate(cond, noise)
    got = ExportedStudent(runner).generate(cond, noise)
    assert got.shape == noise.shape and torch.isfinite(got).all()
    assert not torch.allclose(got, noise)  # the trajectory moved
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    if dtype == "fp32":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        assert cosine > 0.999
        assert (got - expected).abs().mean() < 1e-2 * expected.abs().mean()


def test_sdxl_add_embeds_is_comfyuis_y_and_the_export_wrapper_equals_the_plain_unet():
    unet = tiny_sdxl_unet()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([899.0, 224.0])
    context, pooled = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 32, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 16, 0, 768, 1344]])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        add_embeds = sdxl_add_embeds(pooled, time_ids, 8)
        wrapped = family_spec("sdxl", unet, CASES["sdxl"][3], "fp32").module(x, t, context, add_embeds)
    torch.testing.assert_close(wrapped, plain, atol=1e-5, rtol=1e-5)
    # ComfyUI's Timestep embedder: [cos, sin] of t * exp(-ln(10000) * i / half) per micro-condition
    half = torch.arange(4, dtype=torch.float64)
    angles = 1024.0 * torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * half / 4)
    torch.testing.assert_close(add_embeds[0, 32:40].double(), torch.cat([angles.cos(), angles.sin()]), atol=1e-5, rtol=0)


def test_external_data_goes_to_one_sidecar_file_and_loads_by_path(tmp_path, exports):
    manifest, folder = _export(tmp_path, "pixart", "fp32", external_data="always")
    _, inline = exports["pixart", "fp32"]
    assert manifest.export["external_data"] is True and exports["pixart", "fp32"][0].export["external_data"] is False
    moved = inline.joinpath("model.onnx").stat().st_size - folder.joinpath("model.onnx").stat().st_size
    assert moved > 100_000 and folder.joinpath("model.onnx.data").stat().st_size >= moved  # the weights moved out
    assert (folder / "model.opt.onnx.data").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["engine.json", "model.onnx", "model.onnx.data",
                                                        "model.opt.onnx", "model.opt.onnx.data"]
    assert manifest.validation["passed"]  # ONNX Runtime found the weights next to the file


def test_runner_refuses_shapes_outside_the_profile_and_wrong_input_names(exports):
    manifest, folder = exports["sdxl", "fp32"]
    runner = open_runner(folder, provider="cpu")
    feeds = {"sample": torch.randn(3, 4, 16, 16), "timestep": torch.ones(3), "encoder_hidden_states": torch.randn(3, 8, 64),
             "add_embeds": torch.randn(3, 80)}
    with pytest.raises(ShapeOutsideProfile, match=r"'sample' has shape \[3, 4, 16, 16\].*max \[2, 4, 16, 16\]"):
        runner(**feeds)
    with pytest.raises(ValueError, match=r"missing \['add_embeds'\]"):
        runner(**{k: v[:1] for k, v in feeds.items() if k != "add_embeds"})


def test_cogvideox_needs_a_static_size_and_rotary_models_are_refused():
    with pytest.raises(ValueError, match="static size"):
        family_spec("cogvideox", tiny_cogvideox_transformer(), ExportShapes(height=(2, 4, 4), width=(4, 4, 4)), "fp32")
    rotary = tiny_cogvideox_transformer()
    rotary.register_to_config(use_rotary_positional_embeddings=True)
    with pytest.raises(ValueError, match="rotary"):
        family_spec("cogvideox", rotary, ExportShapes(height=(2, 2, 2), width=(2, 2, 2)), "fp32")
    with pytest.raises(ValueError, match="text_time"):
        family_spec("sdxl", tiny_pixart_transformer(), CASES["sdxl"][3], "fp32")


def test_out_of_tolerance_exits_with_the_figures_and_keeps_the_manifest(tmp_path):
    make, scheduler, grid, shapes = CASES["cogvideox"]
    strict = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0, max_mean_rel=0.0)  # fp16 can never meet it
    with pytest.raises(ValidationFailed, match=r"out of tolerance.*max \|error\|"):
        export_onnx(family_spec("cogvideox", make(), shapes, "fp16"), tmp_path, dtype="fp16", shapes=shapes,
                    scheduler_config=scheduler, timesteps=grid, tolerance=strict)
    recorded = load_manifest(tmp_path).validation
    assert recorded["passed"] is False and all(not c["passed"] for c in recorded["cases"])


def test_dynamo_exporter_is_an_option_and_its_failures_are_named(tmp_path):
    manifest, _ = _export(tmp_path, "cogvideox", "fp32", exporter="dynamo")
    assert manifest.export["exporter"] == "dynamo" and manifest.export["opset"] == 18
    assert manifest.validation["passed"]
    with pytest.raises(ValueError, match="opset 17 with the dynamo exporter"):
        _export(tmp_path / "low", "cogvideox", "fp32", exporter="dynamo", opset=17)
    # torch 2.13's torch.export cannot capture diffusers' PixArt transformer: a named error, not a trace
    with pytest.raises(ExportFailed, match=r"torch.onnx \(dynamo, opset 18\) could not export the pixart model.*"
                                           "--exporter torchscript"):
        _export(tmp_path / "pixart", "pixart", "fp32", exporter="dynamo")


def test_the_cpu_plan_moves_every_axis_and_costs_at_most_two_opt_calls():
    """The default SDXL profile (batch 1:1:4, 512:1024:1024 px, 77:77:154 tokens): the full corners
    cost 5.25 opt-shape calls (the 4 x 1024 px corner alone is 4); the bounded plan at most 2, and
    every dynamic axis still leaves its opt value at least once."""
    shapes = ExportShapes(batch=(1, 1, 4), height=(64, 128, 128), width=(64, 128, 128), text_len=(77, 77, 154))
    cost = lambda points: sum(p["batch"] * p["height"] * p["width"] for p in points) / (128 * 128)  # noqa: E731
    assert cost(shapes.points()) == 5.25
    plan = shapes.bounded_points()
    assert cost(plan) <= 2.0 and plan[0] == {"batch": 1, "height": 128, "width": 128, "text_len": 77}
    for axis, values in (("batch", (1, 4)), ("height", (64, 128)), ("text_len", (77, 154))):
        assert {p[axis] for p in plan} == set(values), axis
