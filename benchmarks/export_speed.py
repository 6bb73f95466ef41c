"""ONNX Runtime (CPU) vs PyTorch eager for an exported SDXL-shaped TDM student: per network call
and for the whole 4-step generation, measured side by side in one run (interleaved rounds,
medians), plus the accuracy of the export.

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
from export.runtime import OnnxRuntimeRunner, TorchRunner  # noqa: E402
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
        runners = {
            "PyTorch eager (fp32)": TorchRunner(spec.module, manifest),
            "ONNX Runtime CPU (fp32)": OnnxRuntimeRunner(Path(folder) / manifest.onnx, manifest, "cpu",
                                                         threads=torch.get_num_threads(), allow_spinning=False),
        }
        result = compare_runtimes(runners, repeats=args.repeats)
    print(f"SDXL-shaped student ({args.size}: {params / 1e6:.1f}M parameters), {args.resolution}x{args.resolution} px, "
          f"torch {torch.__version__}")
    print(f"export + fold + validation: {export_seconds:.1f} s, {manifest.export['nodes_exported']} -> "
          f"{manifest.export['nodes_optimized']} nodes; ONNX Runtime vs PyTorch max |error| "
          f"{max(c['max_abs'] for c in manifest.validation['cases']):.2e}")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
