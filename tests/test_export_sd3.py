"""The SD3-family student through python -m export.trt: ONNX export of a tiny SD3.5 folder with a
TDM LoRA (family sd3, flow_prediction, the grid from pure noise), validated on ONNX Runtime, and
a 4-step generation whose latents equal the PyTorch student's (SD3Backend + tdm_sample) on the
same prompt encoding and noise."""

import json

import pytest
import torch

import onnxruntime  # noqa: F401

from export.trt import main
from tdm_train.lora.export import save_student_lora
from tdm_train.tiny_models import save_tiny_pipeline

GRID = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    from export_helpers import RANK, ALPHA, TARGETS, random_student_lora

    root = tmp_path_factory.mktemp("sd3_export")
    pipeline = save_tiny_pipeline(root / "pipeline", "sd3.5")
    model = SD3Transformer2DModel.from_pretrained(pipeline / "transformer")
    save_student_lora(root / "lora", "sd3", random_student_lora(model, 1), RANK, ALPHA, TARGETS, GRID, 1)
    out = root / "export"
    assert main(["onnx", "--model", str(pipeline), "--lora", str(root / "lora" / "pytorch_lora_weights.safetensors"),
                 "--out-dir", str(out), "--dtype", "fp32", "--height", "16:32:32", "--width", "16:32:32"]) == 0
    return root, pipeline, out


def test_the_export_records_the_flow_family_and_validates(exported):
    _, _, out = exported
    manifest = json.loads((out / "engine.json").read_text())
    assert manifest["family"] == "sd3" and manifest["prediction_type"] == "flow_prediction"
    assert manifest["timesteps"] == GRID and manifest["validation"]["passed"]
    names = [spec["name"] for spec in manifest["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    assert manifest["inputs"][2]["shape"][1] == 77 + 256  # CLIP tokens then T5's, as encode_prompt gives them


def test_generate_equals_the_pytorch_student_on_the_same_noise(exported):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from tdm_train.backends import SD3Backend
    from tdm_train.lora.merge import fuse_lora
    from tdm_train.sampler import tdm_sample
    from tdm_train.training.teachers import encode_prompts

    root, pipeline, out = exported
    assert main(["generate", str(out), "--prompt", "a red cat", "--out", str(root / "cat.safetensors"),
                 "--provider", "cpu", "--seed", "3"]) == 0
    latents = load_file(str(root / "cat.safetensors"))["latents"]
    assert main(["generate", str(out), "--prompt", "a red cat", "--out", str(root / "cat.png"), "--provider", "cpu"]) == 0

    cond, negative = encode_prompts(pipeline, "sd3", ["a red cat"])
    model = SD3Transformer2DModel.from_pretrained(pipeline / "transformer").eval()
    fuse_lora(model, root / "lora" / "pytorch_lora_weights.safetensors")
    backend = SD3Backend(model, json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text()), negative)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = tdm_sample(lambda x, t: backend.x0(x, t, cond), noise, GRID, backend.schedule)
    assert (reference - noise).abs().max() > 0.1  # a real trajectory
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=1e-4)
