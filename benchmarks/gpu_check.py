"""The one-command GPU check of the export path: on a machine with an NVIDIA GPU and the `trt`
extra installed (`bash benchmarks/gpu_check.sh` installs it and runs this), for the tiny test
student and the SDXL-shaped one (248M parameters, benchmarks/export_speed.py's):

  1. export to ONNX in fp16 (validated on ONNX Runtime, CUDA provider when onnxruntime-gpu is there),
  2. build a refittable TensorRT engine (export.tensorrt_engine.build_engine),
  3. validate the engine against the PyTorch fp16 student at the opt shape,
  4. time one call and a whole 4-step generation, PyTorch fp16 vs TensorRT, on the same GPU
     (export.bench.compare_runtimes: interleaved rounds, medians),
  5. tiny student: refit the engine with the weights of the same student under another LoRA and
     check that its output moves to that student's (and away from the first).

It prints one table and writes it (with the raw figures) to --out. Everything runs within about
8 minutes on one GPU (the SDXL-shaped engine build dominates). Without CUDA or TensorRT it stops at
once, saying which is missing (exit 5).

    PYTHONPATH=. python benchmarks/gpu_check.py [--out gpu_check] [--resolution 1024] [--skip-sdxl]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from export.deps import MissingDependency, require_tensorrt  # noqa: E402


def _random_lora(model: torch.nn.Module, seed: int, rank: int = 4, scale: float = 0.05) -> dict:
    """peft-keyed weights on every attention projection (lora_B non-zero, so it changes the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * scale
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * scale
    return state


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0))


def _engine_row(name: str, folder: Path, reference_module, repeats: int) -> tuple[dict, object, object]:
    """Build, validate and time one exported folder; returns (row, engine runner, reference runner)."""
    from export.bench import compare_runtimes
    from export.families import example_inputs, opt_point
    from export.manifest import load_manifest
    from export.runtime import TorchRunner
    from export.tensorrt_engine import TensorRTRunner, build_engine

    started = time.perf_counter()
    engine_path = build_engine(folder, refit=True, timing_cache=folder / "timing.cache", progress=False)
    build_seconds = time.perf_counter() - started
    manifest = load_manifest(folder)
    engine = TensorRTRunner(engine_path, manifest)
    reference = TorchRunner(reference_module.to("cuda", torch.float16).eval(), manifest)
    feeds = example_inputs(manifest.inputs, manifest.export.get("dynamic_axes", {}), opt_point(manifest),
                           torch.Generator().manual_seed(0))
    feeds = {k: v.cuda() for k, v in feeds.items()}
    expected, got = reference(**feeds), engine(**feeds)
    timing = compare_runtimes({"PyTorch fp16": reference, "TensorRT": engine}, repeats=repeats)["runtimes"]
    row = {"student": name, "latent": list(feeds["sample"].shape), "build_s": round(build_seconds, 1),
           "engine_mb": round(engine_path.stat().st_size / 2**20, 1),
           "pytorch_ms": timing["PyTorch fp16"]["call"]["median_ms"], "tensorrt_ms": timing["TensorRT"]["call"]["median_ms"],
           "call_speedup": timing["TensorRT"]["call_speedup"], "generation_speedup": timing["TensorRT"]["generation_speedup"],
           "max_abs": float((got - expected).abs().max()), "cosine": _cosine(got, expected),
           "generation_max_abs": timing["TensorRT"]["generation_max_abs_vs_baseline"]}
    return row, engine, reference


def check_tiny(out: Path, repeats: int) -> dict:
    """The tiny SDXL test student through the CLI's own export, then build, validate, time, refit."""
    from export.families import example_inputs, opt_point
    from export.loading import reference_module
    from export.manifest import load_manifest
    from export.tensorrt_engine import TensorRTRunner, refit_engine
    from export.trt import main as trt_main
    from diffusers import UNet2DConditionModel
    from tdm_train.lora.export import save_student_lora
    from tdm_train.tiny_models import save_tiny_pipeline

    pipeline = save_tiny_pipeline(out / "tiny" / "pipeline", "sdxl")
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    folders = {}
    for tag, seed in (("a", 1), ("b", 2)):  # the same student under two LoRAs
        lora = out / "tiny" / f"lora_{tag}"
        save_student_lora(lora, "sdxl", _random_lora(unet, seed), 4, 4.0, ("to_q", "to_k", "to_v", "to_out.0"),
                          [899, 674, 449, 224], 1)
        folders[tag] = out / "tiny" / f"export_{tag}"
        code = trt_main(["onnx", "--model", str(pipeline), "--lora", str(lora / "pytorch_lora_weights.safetensors"),
                         "--out-dir", str(folders[tag]), "--dtype", "fp16", "--force"])
        if code:
            raise RuntimeError(f"the tiny student's ONNX export failed (exit {code})")
    row, engine, reference = _engine_row("tiny SDXL test student", folders["a"],
                                         reference_module(load_manifest(folders["a"])), repeats)

    # refit: the engine of LoRA a takes the weights of the LoRA-b export; its output must become b's
    manifest_b = load_manifest(folders["b"])
    refitted_path = folders["a"] / ("refitted_" + Path(engine.path).name)
    shutil.copyfile(engine.path, refitted_path)
    weights = refit_engine(refitted_path, folders["b"] / manifest_b.onnx)
    feeds = {k: v.cuda() for k, v in example_inputs(manifest_b.inputs, manifest_b.export.get("dynamic_axes", {}),
                                                     opt_point(manifest_b), torch.Generator().manual_seed(5)).items()}
    from export.runtime import TorchRunner

    reference_b = TorchRunner(reference_module(manifest_b).to("cuda", torch.float16).eval(), manifest_b)
    before, after = engine(**feeds), TensorRTRunner(refitted_path, load_manifest(folders["a"]))(**feeds)
    want = reference_b(**feeds)
    row["refit"] = {"weights": weights, "max_abs_vs_lora_b": float((after - want).abs().max()),
                    "moved": float((after - before).abs().max()),
                    "lora_difference": float((want - reference(**feeds)).abs().max())}
    row["refit_ok"] = (row["refit"]["max_abs_vs_lora_b"] < 0.1 * max(row["refit"]["lora_difference"], 1e-6)
                       and row["refit"]["moved"] > 0.5 * row["refit"]["lora_difference"])
    return row


def check_sdxl_shaped(out: Path, resolution: int, repeats: int) -> dict:
    """The 248M SDXL-shaped student (export_speed.py's) at ``resolution`` px, batch 1, static shape."""
    from diffusers import UNet2DConditionModel

    from export.families import ExportShapes, family_spec
    from export.onnx_export import export_onnx
    from export_speed import SMALL_SDXL_UNET
    from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG

    torch.manual_seed(0)
    side = resolution // 8
    shapes = ExportShapes(batch=(1, 1, 1), height=(side,) * 3, width=(side,) * 3, text_len=(77,) * 3)
    spec = family_spec("sdxl", UNet2DConditionModel(**SMALL_SDXL_UNET).eval(), shapes, "fp32")
    reference = copy.deepcopy(spec.module)  # export_onnx casts the spec's module to fp16 in place
    spec.module.cuda()  # references and the trace on the GPU
    folder = out / "sdxl_shaped"
    shutil.rmtree(folder, ignore_errors=True)
    export_onnx(spec, folder, dtype="fp16", shapes=shapes, scheduler_config=SDXL_SCHEDULER_CONFIG,
                timesteps=[899, 674, 449, 224], log=lambda line: print(line, flush=True))
    row, _, _ = _engine_row(f"SDXL-shaped student (248M), {resolution} px", folder, reference, repeats)
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__})", "",
             "| student | latent | build (s) | engine (MB) | PyTorch fp16 (ms/call) | TensorRT (ms/call) | speed-up "
             "per call | speed-up per 4-step generation | max err vs PyTorch | cosine | refit |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        refit = "ok" if r.get("refit_ok") else ("FAILED" if "refit" in r else "-")
        lines.append(f"| {r['student']} | {r['latent']} | {r['build_s']} | {r['engine_mb']} | {r['pytorch_ms']:.2f} | "
                     f"{r['tensorrt_ms']:.2f} | {r['call_speedup']:.2f}x | {r['generation_speedup']:.2f}x | "
                     f"{r['max_abs']:.3g} | {r['cosine']:.6f} | {refit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="working folder; the table goes to <out>/gpu_check.md")
    parser.add_argument("--resolution", type=int, default=1024, help="pixels for the SDXL-shaped student")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-sdxl", action="store_true", help="the tiny student only (about a minute)")
    args = parser.parse_args(argv)
    try:
        if not torch.cuda.is_available():
            raise MissingDependency(f"torch {torch.__version__} sees no CUDA device: the GPU check needs an NVIDIA "
                                    "GPU and a CUDA build of torch")
        require_tensorrt()
    except MissingDependency as error:
        print(f"error: {error}", file=sys.stderr)
        return 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [check_tiny(out, args.repeats)]
    if not args.skip_sdxl:
        rows.append(check_sdxl_shaped(out, args.resolution, args.repeats))
    table = format_table(rows)
    print(table)
    print(f"\nwhole check: {time.perf_counter() - started:.0f} s")
    (out / "gpu_check.md").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    failed = [r["student"] for r in rows if r["cosine"] < 0.999 or ("refit" in r and not r["refit_ok"])]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
