"""python -m export.trt onnx with a TDM-unify LoRA (one student for K = 1, 2, 4): --num-steps K is
required, c_K is folded into the bias before tracing, engine.json records K and unify_steps, and
the export is sampled with K steps only."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from export_helpers import SIZES, tiny_student  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from export.trt import EXIT_BAD_INPUT, main  # noqa: E402
from tdm_train.lora.step_embedding import StepConditions, applied  # noqa: E402

STEPS = (1, 2, 4)


@pytest.fixture(scope="module")
def unify(tmp_path_factory):
    """(pipeline, unify LoRA file, plain LoRA file, step conditions, export folder at K=2)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("unify")
    pipeline, lora_dir = tiny_student(root, "sdxl")
    plain = lora_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(plain), "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    dim = UNet2DConditionModel.from_pretrained(pipeline / "unet").time_embedding.linear_2.out_features
    generator = torch.Generator().manual_seed(3)
    conditions = StepConditions.for_family("sdxl", {k: torch.randn(dim, generator=generator) for k in STEPS})
    path = root / "unify.safetensors"
    save_file({**state, **conditions.tensors()}, str(path), metadata={**metadata, **conditions.metadata()})
    out = root / "export_k2"
    assert main(["onnx", "--model", str(pipeline), "--lora", str(path), "--num-steps", "2", "--out-dir", str(out),
                 "--dtype", "fp32", *SIZES]) == 0
    return pipeline, path, plain, conditions, out


def test_engine_json_records_k_its_grid_and_the_trained_steps(unify):
    _, path, _, _, out = unify
    manifest = json.loads((out / "engine.json").read_text())
    assert manifest["num_steps"] == 2 and manifest["unify_steps"] == [1, 2, 4]
    assert manifest["timesteps"] == [899, 449]  # the uniform 2-step grid the student was trained on
    assert manifest["source"]["lora"]["step_condition"] == {"target": "time_embedding.linear_2", "num_steps": 2,
                                                            "unify_steps": [1, 2, 4]}
    assert manifest["validation"]["passed"]


def test_export_at_k2_equals_the_hooked_pytorch_student_at_k2_on_onnx_runtime(unify):
    from export.families import example_inputs, family_spec, opt_point, shapes_from_manifest
    from export.loading import load_student
    from export.manifest import load_manifest
    from export.runtime import TorchRunner, open_runner

    pipeline, _, plain, conditions, out = unify
    manifest = load_manifest(out)
    student = load_student(pipeline, plain)  # the LoRA weights fused, no step condition
    module = family_spec("sdxl", student.model, shapes_from_manifest(manifest), "fp32").module
    reference, runner = TorchRunner(module, manifest), open_runner(out, "cpu")
    feeds = example_inputs(manifest.inputs, manifest.export["dynamic_axes"], opt_point(manifest),
                           torch.Generator().manual_seed(0))
    exported = runner(**feeds)
    diffs = {}
    for k in STEPS:
        with applied(student.model, conditions, k):
            diffs[k] = float((reference(**feeds) - exported).abs().max())
    diffs["none"] = float((reference(**feeds) - exported).abs().max())
    scale = float(exported.abs().max())
    assert diffs[2] < 1e-4 * max(1.0, scale), diffs
    assert min(diffs[1], diffs[4], diffs["none"]) > 100 * diffs[2], diffs  # c_2 and nothing else is in it


def test_validate_rebuilds_the_k2_reference_and_generate_refuses_another_step_count(unify, capsys):
    from export.generate import ExportedStudent
    from export.runtime import open_runner

    _, _, _, _, out = unify
    assert main(["validate", str(out), "--provider", "cpu"]) == 0
    assert "2-step generation" in capsys.readouterr().out
    student = ExportedStudent(open_runner(out, "cpu"))
    cond = {"prompt_embeds": torch.zeros(1, 77, student.manifest.input("encoder_hidden_states").shape[-1]),
            "add_embeds": torch.zeros(1, student.manifest.input("add_embeds").shape[-1])}
    noise = torch.randn(student.latent_shape(1))
    assert student.generate(cond, noise).isfinite().all()
    with pytest.raises(ValueError, match=r"2-step TDM-unify student .*trained for K = \[1, 2, 4\].*--num-steps 4"):
        student.generate(cond, noise, timesteps=[899, 674, 449, 224])


def test_missing_or_untrained_k_and_num_steps_on_a_plain_lora_are_clear_errors(unify, tmp_path, capsys):
    pipeline, path, plain, _, _ = unify
    base = ["onnx", "--model", str(pipeline), "--out-dir", str(tmp_path), "--dtype", "fp32", *SIZES]
    assert main([*base, "--lora", str(path)]) == EXIT_BAD_INPUT
    assert "TDM-unify LoRA trained for K = 1, 2, 4 sampling steps: an export is for one of them, pass --num-steps" \
        in capsys.readouterr().err
    assert main([*base, "--lora", str(path), "--num-steps", "3"]) == EXIT_BAD_INPUT
    assert "--num-steps 3: " in capsys.readouterr().err
    assert main([*base, "--lora", str(plain), "--num-steps", "2"]) == EXIT_BAD_INPUT
    assert "carries no step condition" in capsys.readouterr().err
    assert not (tmp_path / "engine.json").exists()


def test_refit_refuses_the_weights_of_another_k(unify):
    from export.manifest import load_manifest
    from export.tensorrt_engine import check_refit_steps

    manifest = load_manifest(unify[4])
    check_refit_steps(manifest, manifest)  # the same K: fine
    with pytest.raises(ValueError, match="the engine is the K=2 TDM-unify student, the ONNX the K=4"):
        check_refit_steps(manifest, dataclasses.replace(manifest, num_steps=4))
    with pytest.raises(ValueError, match="the ONNX a fixed-K student"):
        check_refit_steps(manifest, dataclasses.replace(manifest, num_steps=None, unify_steps=None))
