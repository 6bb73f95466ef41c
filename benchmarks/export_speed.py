"""CPU runtimes of an exported SDXL-shaped TDM student — PyTorch eager fp32 and bf16 autocast, ONNX
Runtime plain and with IO binding, OpenVINO f32 and bf16 — per network call and for the whole
4-step generation, measured side by side in one run (interleaved rounds, medians), with each
runtime's cosine against the fp32 student and the instruction sets each can use.

    .venv/bin/python benchmarks/export_speed.py [--size small|tiny] [--resolution 512] [--repeats 10]

The student is SDXL's UNet layout (three levels, DownBlock2D then two cross-attention levels,
1/2/4 transformer layers, 2048-wide text states, the 2816-wide added conditioning) at a third
of SDXL's width, random weights, built from its config (nothing downloaded). The full SDXL UNet
exports the same way (`python -m export.trt onnx`) but does not fit a CPU benchmark's time.
Both runtimes get the same number of threads (torch's); ONNX Runtime's worker threads do not
spin between calls, so they do not steal time from PyTorch's turns.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from export.bench import compare_runtimes, format_table  # noqa: E402
from export.families import ExportShapes, family_spec  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.deps import MissingDependency  # noqa: E402
from export.runtime import (OPENVINO_PRECISIONS, OnnxRuntimeRunner, OpenVINORunner, TorchRunner,  # noqa: E402
                            instruction_sets)
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, TINY_SDXL_UNET  # noqa: E402

# SDXL's UNet at about a third of its width and depth (SDXL: 320/640/1280 channels, 1/2/10 layers)
SMALL_SDXL_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 4, 8), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--resolution", type=int, default=512, help="pixels (latent = / 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = SMALL_SDXL_UNET if args.size == "small" else TINY_SDXL_UNET
    unet = UNet2DConditionModel(**config).eval()
    params = sum(p.numel() for p in unet.parameters())
    side = args.resolution // 8
    text_len = 77
    shapes = ExportShapes(batch=(1, 1, 2), height=(side, side, side), width=(side, side, side),
                          text_len=(text_len, text_len, text_len))
    spec = family_spec("sdxl", unet, shapes, "fp32")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        manifest = export_onnx(spec, folder, dtype="fp32", shapes=shapes, scheduler_config=SDXL_SCHEDULER_CONFIG,
                               timesteps=[899, 674, 449, 224], threads=torch.get_num_threads())
        export_seconds = time.perf_counter() - started
        onnx, threads = Path(folder) / manifest.onnx, torch.get_num_threads()
        runners = {
            "PyTorch eager (fp32)": TorchRunner(spec.module, manifest),
            "PyTorch eager (bf16 autocast)": TorchRunner(spec.module, manifest, autocast=torch.bfloat16),
            "ONNX Runtime CPU (fp32)": OnnxRuntimeRunner(onnx, manifest, "cpu", threads=threads, allow_spinning=False),
            "ONNX Runtime CPU (fp32), IO binding": OnnxRuntimeRunner(onnx, manifest, "cpu", threads=threads,
                                                                     allow_spinning=False, io_binding=True),
        }
        for precision in OPENVINO_PRECISIONS:
            try:
                runners[f"OpenVINO CPU ({precision})"] = OpenVINORunner(onnx, manifest, precision, threads)
            except MissingDependency as error:
                print(f"skipping OpenVINO {precision}: {error}", file=sys.stderr)
        result = compare_runtimes(runners, repeats=args.repeats)
        reference = result["runtimes"]["PyTorch eager (fp32)"]
        accuracy = {name: _cosine_vs(runner, runners["PyTorch eager (fp32)"], manifest) for name, runner in runners.items()}
    print(f"SDXL-shaped student ({args.size}: {params / 1e6:.1f}M parameters), {args.resolution}x{args.resolution} px, "
          f"torch {torch.__version__}")
    print(f"export + fold + validation: {export_seconds:.1f} s, {manifest.export['nodes_exported']} -> "
          f"{manifest.export['nodes_optimized']} nodes; ONNX Runtime vs PyTorch max |error| "
          f"{max(c['max_abs'] for c in manifest.validation['cases']):.2e}")
    print(instruction_sets())
    print(format_table(result))
    best_torch = min(("PyTorch eager (fp32)", "PyTorch eager (bf16 autocast)"),
                     key=lambda n: result["runtimes"][n]["generation"]["median_ms"])
    print(f"\n| runtime | cosine vs PyTorch fp32 (one call, opt shape) | 4-step generation vs PyTorch fp32 | "
          f"vs the best PyTorch CPU option ({best_torch}) |\n|---|---:|---:|---:|")
    best = result["runtimes"][best_torch]["generation"]["median_ms"]
    for name, row in result["runtimes"].items():
        print(f"| {name} | {accuracy[name]:.6f} | {reference['generation']['median_ms'] / row['generation']['median_ms']:.2f}x | "
              f"{best / row['generation']['median_ms']:.2f}x |")
    return 0


def _cosine_vs(runner, reference, manifest) -> float:
    from export.families import example_inputs, opt_point

    feeds = example_inputs(manifest.inputs, manifest.export.get("dynamic_axes", {}), opt_point(manifest),
                           torch.Generator().manual_seed(7))
    a, b = runner(**feeds).flatten().double(), reference(**feeds).flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, 0))


if __name__ == "__main__":
    sys.exit(main())
