"""OpenVINO as a runtime of exported students (CPU, f32 and bf16 inference precision): the runner
against the fp32 PyTorch student (f32 elementwise, bf16 by statistics), a whole 4-step generation
compared, and the CLI's validate / generate / bench with it; ONNX Runtime's IO binding path gives
the plain path's output."""

import json

import pytest
import torch

import openvino  # noqa: F401  (the dev extra installs it: a missing package fails, not skips)

from export_helpers import SIZES, tiny_student

from export.families import example_inputs, shapes_from_manifest
from export.generate import ExportedStudent
from export.loading import reference_module
from export.manifest import load_manifest
from export.runtime import OnnxRuntimeRunner, OpenVINORunner, TorchRunner
from export.trt import main
from export.validate import TOLERANCES, compare
from tdm_train.errors import MissingDependency

# bf16 inference needs BF16 units (AVX-512 bf16 / AMX); on other CPUs OpenVINO bf16 is refused
CPU_HAS_BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not CPU_HAS_BF16, reason="this CPU has no BF16 units for OpenVINO (AVX2-only): "
                                "bf16 inference is refused here, see the test of the refusal")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    pipeline, lora = tiny_student(root, "sdxl")
    out = root / "export"
    assert main(["onnx", "--model", str(pipeline), "--lora", str(lora / "pytorch_lora_weights.safetensors"),
                 "--out-dir", str(out), "--dtype", "fp32", "--text-len", "77:77:154", *SIZES]) == 0
    manifest = load_manifest(out)
    return root, pipeline, out, manifest, TorchRunner(reference_module(manifest), manifest)


@pytest.mark.parametrize("precision", ["f32", pytest.param("bf16", marks=needs_bf16)])
def test_openvino_matches_the_fp32_student_at_every_planned_shape(export, precision):
    _, _, out, manifest, reference = export
    runner = OpenVINORunner(out / manifest.onnx, manifest, precision=precision, threads=2)
    generator = torch.Generator().manual_seed(0)
    for point in shapes_from_manifest(manifest).bounded_points():
        feeds = example_inputs(manifest.inputs, manifest.export["dynamic_axes"], point, generator)
        stats = compare(reference(**feeds), runner(**feeds))
        if precision == "f32":
            assert stats.max_abs < 1e-4 and stats.cosine > 0.99999, (point, stats)
        else:  # bf16: by statistics, as fp16 exports (and it must not be the f32 path in disguise)
            assert not stats.failures(TOLERANCES["bf16"]) and stats.cosine > 0.999 and stats.max_abs > 1e-5, (point, stats)


def test_a_whole_generation_on_openvino_follows_the_pytorch_student(export):
    _, _, out, manifest, reference = export
    feeds = example_inputs(manifest.inputs, manifest.export["dynamic_axes"],
                           {"batch": 1, "height": 16, "width": 16, "text_len": 77}, torch.Generator().manual_seed(1))
    cond = {"prompt_embeds": feeds["encoder_hidden_states"], "add_embeds": feeds["add_embeds"]}
    noise = torch.randn(feeds["sample"].shape, generator=torch.Generator().manual_seed(2))
    expected = ExportedStudent(reference).generate(cond, noise)
    f32 = ExportedStudent(OpenVINORunner(out / manifest.onnx, manifest)).generate(cond, noise)
    assert (expected - noise).abs().max() > 0.1
    assert (f32 - expected).abs().max() < 1e-3
    if not CPU_HAS_BF16:
        return  # the f32 generation is the whole check on a CPU without BF16 units
    bf16 = ExportedStudent(OpenVINORunner(out / manifest.onnx, manifest, precision="bf16")).generate(cond, noise)
    cosine = torch.nn.functional.cosine_similarity(bf16.flatten(), expected.flatten(), 0)
    assert cosine > 0.999 and (bf16 - expected).abs().max() > 1e-5


def test_io_binding_gives_the_plain_onnx_runtime_output(export):
    _, _, out, manifest, _ = export
    feeds = example_inputs(manifest.inputs, manifest.export["dynamic_axes"],
                           {"batch": 2, "height": 8, "width": 8, "text_len": 154}, torch.Generator().manual_seed(3))
    plain = OnnxRuntimeRunner(out / manifest.onnx, manifest)(**feeds)
    bound = OnnxRuntimeRunner(out / manifest.onnx, manifest, io_binding=True)(**feeds)
    assert torch.equal(plain, bound)


def test_the_cli_validates_generates_and_benches_with_openvino(export, capsys, tmp_path):
    root, pipeline, out, _, _ = export
    for provider in ("openvino", "openvino-bf16") if CPU_HAS_BF16 else ("openvino",):
        assert main(["validate", str(out), "--provider", provider]) == 0, provider
    assert main(["generate", str(out), "--prompt", "a red cat", "--out", str(tmp_path / "cat.png"),
                 "--provider", "openvino"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--repeats", "2", "--threads", "2", "--json", str(tmp_path / "b.json")]) == 0
    captured = capsys.readouterr()
    rows = json.loads((tmp_path / "b.json").read_text())["runtimes"]
    names = ["PyTorch eager (cpu, float32)", "PyTorch eager (cpu, bf16 autocast)", "ONNX Runtime CPU (fp32)",
             "ONNX Runtime CPU (fp32), IO binding", "OpenVINO CPU (f32)"]
    if CPU_HAS_BF16:
        names.append("OpenVINO CPU (bf16)")
    else:  # the row is left out and the run says why
        assert "OpenVINO CPU (bf16)" not in rows and "skipping OpenVINO bf16: " in captured.err
    for name in names:
        assert name in rows and f"| {name} |" in captured.out, name
    assert "PyTorch CPU kernels:" in captured.err and "OpenVINO CPU:" in captured.err


@pytest.mark.skipif(CPU_HAS_BF16, reason="this CPU has BF16 units: OpenVINO bf16 runs (tested above)")
def test_bf16_on_a_cpu_without_bf16_units_is_refused_with_the_reason(export, capsys):
    _, _, out, manifest, _ = export
    with pytest.raises(MissingDependency, match="no BF16 units: use precision f32"):
        OpenVINORunner(out / manifest.onnx, manifest, precision="bf16")
    capsys.readouterr()
    assert main(["validate", str(out), "--provider", "openvino-bf16"]) != 0
    assert "no BF16 units" in capsys.readouterr().err


def test_a_precision_openvino_does_not_have_is_refused(export):
    _, _, out, manifest, _ = export
    with pytest.raises(ValueError, match="expected one of"):
        OpenVINORunner(out / manifest.onnx, manifest, precision="int4")


def test_inputs_whose_tensors_openvino_merges_keep_their_names(tmp_path):
    """PixArt-1024's mask and micro-conditions go through casts that OpenVINO folds into the inputs,
    which then carry several tensor names: each engine.json name must still find its input (the
    first OpenVINO runner took one arbitrary name per input and refused this export)."""
    from export.families import ExportShapes, family_spec
    from export.onnx_export import export_onnx
    from tdm_train.tiny_models import PIXART_SCHEDULER_CONFIG, tiny_pixart_transformer

    shapes = ExportShapes(batch=(1, 2, 2), height=(8, 8, 8), width=(8, 8, 8), text_len=(16, 16, 16))
    manifest = export_onnx(family_spec("pixart", tiny_pixart_transformer(128), shapes, "fp32"), tmp_path, dtype="fp32",
                           shapes=shapes, scheduler_config=PIXART_SCHEDULER_CONFIG, timesteps=[899, 674, 449, 224])
    feeds = example_inputs(manifest.inputs, manifest.export["dynamic_axes"], shapes.points()[0],
                           torch.Generator().manual_seed(0))
    expected = OnnxRuntimeRunner(tmp_path / manifest.onnx, manifest)(**feeds)
    got = OpenVINORunner(tmp_path / manifest.onnx, manifest)(**feeds)
    assert "encoder_attention_mask" in manifest.input_names and (got - expected).abs().max() < 1e-4
