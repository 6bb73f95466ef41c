"""python -m export.trt end to end on tiny pipeline folders with a TDM LoRA: export, validate,
generate, bench, inspect, and the clear errors (no TensorRT, bad input) with their exit codes."""

import json
import subprocess
import sys

import pytest

import onnxruntime  # noqa: F401
import onnx_graphsurgeon  # noqa: F401

from export_helpers import SIZES, TIMESTEPS, tiny_student  # noqa: E402

from export.trt import EXIT_BAD_FILE, EXIT_BAD_INPUT, EXIT_MISSING, EXIT_TOLERANCE, main  # noqa: E402



@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pipeline, lora = tiny_student(root, "sdxl")
    out = root / "export"
    code = main(["onnx", "--model", str(pipeline), "--lora", str(lora / "pytorch_lora_weights.safetensors"),
                 "--out-dir", str(out), "--dtype", "fp32", "--text-len", "77:77:154", *SIZES])
    assert code == 0
    return root, pipeline, lora, out


def test_onnx_export_records_the_fused_lora_and_its_timesteps(sdxl, capsys):
    root, pipeline, lora, out = sdxl
    manifest = json.loads((out / "engine.json").read_text())
    assert manifest["source"]["lora"]["strength"] == 1.0
    assert manifest["source"]["lora"]["strength_source"] == "metadata tdm.lora_strength"
    assert manifest["timesteps"] == TIMESTEPS and manifest["latent"]["vae_scale_factor"] == 2
    assert manifest["inputs"][0]["profile"]["min"] == [1, 4, 8, 8]  # 16 px / 2
    assert manifest["inputs"][2]["profile"]["max"] == [4, 154, 64]  # two 77-token chunks


def test_the_default_export_takes_the_models_own_size_and_reports_every_phase(tmp_path, capsys):
    """No size flags: the profile is the UNet's sample_size (16 latents for the tiny one, 32 px at its VAE
    factor 2) as opt and max, half as min; before, the fixed 512:1024:1024 px default meant 512x512
    latents here and a validation that ran out of memory after 9 minutes."""
    pipeline, lora = tiny_student(tmp_path, "sdxl")
    assert main(["onnx", "--model", str(pipeline), "--out-dir", str(tmp_path / "out"), "--dtype", "fp32",
                 "--provider", "cpu"]) == 0
    err = capsys.readouterr().err
    for phase in ("loading ", "PyTorch reference outputs at 2 shape(s) (CPU, bounded", "tracing the sdxl network",
                  "saving model.onnx", "folding constants", "validating on ONNX Runtime (CPU) at batch 1, 16x16 latent",
                  "(2 of 2)"):
        assert phase in err, phase
    assert err.count(" s") >= 6  # each phase ends with its seconds
    manifest = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert manifest["validation"]["plan"].startswith("CPU, bounded")
    profile = manifest["inputs"][0]["profile"]
    assert [profile[k][2] for k in ("min", "opt", "max")] == [8, 16, 16] and profile["max"][0] == 4


def test_validate_passes_with_the_lora_and_fails_without_it(sdxl, capsys):
    root, pipeline, lora, out = sdxl
    assert main(["validate", str(out), "--provider", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "4-step generation" in text and "ONNX Runtime passed" in text
    # the same base without the LoRA is a different network: the export holds the fused weights
    assert main(["validate", str(out), "--model", str(pipeline), "--provider", "cpu"]) == EXIT_TOLERANCE
    assert "FAILED" in capsys.readouterr().out


def test_kohya_file_exports_the_same_network(sdxl, tmp_path):
    root, pipeline, lora, out = sdxl
    code = main(["onnx", "--model", str(pipeline), "--lora", str(lora / "tdm_lora_comfyui.safetensors"),
                 "--out-dir", str(tmp_path), "--dtype", "fp32", "--text-len", "77:77:154", *SIZES])
    assert code == 0
    # the diffusers-file export's PyTorch reference validates this export too
    assert main(["validate", str(tmp_path), "--model", str(pipeline), "--lora",
                 str(lora / "pytorch_lora_weights.safetensors"), "--provider", "cpu"]) == 0


def test_generate_writes_an_image_and_latents(sdxl):
    from PIL import Image
    from safetensors.torch import load_file

    root, _, _, out = sdxl
    assert main(["generate", str(out), "--prompt", "a red cat", "--out", str(root / "cat.png"), "--provider", "cpu"]) == 0
    with Image.open(root / "cat.png") as image:
        assert image.size == (32, 32)
    assert main(["generate", str(out), "--prompt", "a red cat", "--out", str(root / "cat.safetensors"),
                 "--height", "16", "--width", "32", "--seed", "3", "--provider", "cpu"]) == 0
    latents = load_file(str(root / "cat.safetensors"))["latents"]
    assert latents.shape == (1, 4, 8, 16) and latents.isfinite().all()


def test_bench_prints_a_side_by_side_table(sdxl, capsys, tmp_path):
    _, _, _, out = sdxl
    assert main(["bench", str(out), "--repeats", "2", "--json", str(tmp_path / "bench.json")]) == 0
    text = capsys.readouterr().out
    assert "| PyTorch eager (cpu, float32) |" in text and "| ONNX Runtime CPU (fp32) |" in text
    result = json.loads((tmp_path / "bench.json").read_text())
    ort = result["runtimes"]["ONNX Runtime CPU (fp32)"]
    assert ort["call"]["median_ms"] > 0 and ort["generation_max_abs_vs_baseline"] < 1e-3


def test_inspect_and_build_without_tensorrt(sdxl, capsys):
    _, _, _, out = sdxl
    assert main(["inspect", str(out / "model.opt.onnx")]) == 0
    text = capsys.readouterr().out
    assert '"family": "sdxl"' in text and "opset 17" in text
    pytest.importorskip  # noqa: B018  (the build error below is what a CPU-only machine must say)
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["build", "--onnx", str(out)]) == EXIT_MISSING
    assert "pip install .[trt]" in capsys.readouterr().err


def test_single_file_checkpoint_with_its_config_folder(sdxl, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    _, pipeline, _, _ = sdxl
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    single = tmp_path / "student.safetensors"
    save_file(unet.state_dict(), str(single))
    assert main(["onnx", "--model", str(single), "--out-dir", str(tmp_path / "a"), "--dtype", "fp32", *SIZES]) \
        == EXIT_BAD_INPUT
    assert "pass --config" in capsys.readouterr().err
    assert main(["onnx", "--model", str(single), "--config", str(pipeline), "--out-dir", str(tmp_path / "b"),
                 "--dtype", "fp32", *SIZES]) == 0


def test_bad_inputs_get_clear_errors(sdxl, tmp_path, capsys):
    root, pipeline, _, _ = sdxl
    assert main(["onnx", "--model", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "no such file or folder" in capsys.readouterr().err
    _, pixart_lora = tiny_student(tmp_path / "pixart", "pixart")
    assert main(["onnx", "--model", str(pipeline), "--lora", str(pixart_lora / "pytorch_lora_weights.safetensors"),
                 "--out-dir", str(tmp_path / "x"), *SIZES]) == EXIT_BAD_FILE
    err = capsys.readouterr().err
    assert "matched no weight" in err and "transformer_blocks.0.attn1.to_q" in err
    assert main(["onnx", "--model", str(pipeline), "--out-dir", str(tmp_path / "y"), "--height", "17"]) \
        == EXIT_BAD_INPUT
    assert "multiples of the VAE factor 2" in capsys.readouterr().err
    cog, _ = tiny_student(tmp_path / "cog", "cogvideox")
    assert main(["onnx", "--model", str(cog), "--out-dir", str(tmp_path / "z"), "--frames", "10", "--height", "16",
                 "--width", "16"]) == EXIT_BAD_INPUT
    assert "4k+1" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "engine.json not found" in capsys.readouterr().err


def test_cogvideox_exports_from_its_folder(tmp_path):
    pipeline, lora = tiny_student(tmp_path, "cogvideox")
    assert main(["onnx", "--model", str(pipeline), "--lora", str(lora / "pytorch_lora_weights.safetensors"),
                 "--out-dir", str(tmp_path / "out"), "--frames", "9", "--height", "16", "--width", "16"]) == 0
    manifest = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert manifest["inputs"][0]["shape"] == [-1, 3, 4, 2, 2] and manifest["dtype"] == "fp16"
    assert manifest["prediction_type"] == "v_prediction" and manifest["validation"]["passed"]


def test_module_entry_point_help_lists_every_subcommand():
    done = subprocess.run([sys.executable, "-m", "export.trt", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("onnx", "build", "refit", "validate", "bench", "generate", "inspect"):
        assert command in done.stdout


@pytest.mark.parametrize("family,shape_flags", [
    ("pixart", ["--height", "16:32:32", "--width", "16:32:32", "--text-len", "16"]),
    ("cogvideox", ["--frames", "9", "--height", "16", "--width", "16"]),
])
def test_generate_pixart_and_cogvideox_exports(tmp_path, family, shape_flags):
    """A PixArt export with its own text length (T5 states cut to it, mask kept) and a CogVideoX
    export (its first frame) give images through the base folder's encoders and VAE."""
    from PIL import Image

    pipeline, lora = tiny_student(tmp_path, family)
    out = tmp_path / "out"
    assert main(["onnx", "--model", str(pipeline), "--lora", str(lora / "pytorch_lora_weights.safetensors"),
                 "--out-dir", str(out), "--dtype", "fp32", *shape_flags]) == 0
    assert main(["generate", str(out), "--prompt", "a red cat", "--out", str(tmp_path / "x.png"),
                 "--provider", "cpu"]) == 0
    with Image.open(tmp_path / "x.png") as image:
        assert image.size == ((32, 32) if family == "pixart" else (16, 16))
    if family == "pixart":  # more T5 tokens than the export takes: a clear error, not a shape crash
        long_prompt = " ".join(["red cat"] * 12)
        assert main(["generate", str(out), "--prompt", long_prompt, "--out", str(tmp_path / "y.png"),
                     "--provider", "cpu"]) == EXIT_BAD_INPUT
