"""``python -m export.trt``: TDM students to ONNX and TensorRT engines, and back out again.

  onnx      base model (+ TDM LoRA fused at its strength) -> model.onnx, model.opt.onnx, engine.json,
            checked on ONNX Runtime against PyTorch (CUDA when there; a bounded plan on the CPU; exit 1
            when out of tolerance)
  build     engine.json + ONNX -> TensorRT engine (NVIDIA GPU; refittable by default)
  refit     put another LoRA's weights into a refittable engine (ONNX exported the same way)
  validate  an ONNX file or engine vs the PyTorch student (ONNX Runtime, OpenVINO f32 / bf16, TensorRT):
            one call per planned shape and a whole few-step generation
  bench     PyTorch eager (fp32, bf16 autocast), ONNX Runtime (plain, IO binding), OpenVINO (f32, bf16)
            and TensorRT when there, per call and per generation
  generate  prompt -> image (or latents) through the exported student on ONNX Runtime / OpenVINO / TensorRT
  inspect   what an export is: engine.json, the ONNX graph, the engines

Exit codes (tdm_train/errors.py, shared with python -m tdm_train): 0 fine, 1 out of tolerance (or an
export whose validation failed, refused without --force), 2 bad input, 3 an incompatible or corrupt
file, 4 output refused (an export already there without --force, not writable, disk full), 5 a
missing package or device (the message says what to install), 6 non-finite numbers (a NaN LoRA,
a NaN output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tdm_train.errors import (  # noqa: F401  (the exit codes, re-exported for scripts and tests)
    EXIT_BAD_FILE, EXIT_BAD_INPUT, EXIT_MISSING, EXIT_NONFINITE, EXIT_OUTPUT, EXIT_TOLERANCE, BadInput,
    IncompatibleFile, NonFinite, OutputRefused, run_cli)


def _range(text: str) -> tuple[int, int, int]:
    """'1024' -> (1024, 1024, 1024); '512:1024:1536' -> min:opt:max."""
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not parts[0] <= parts[1] <= parts[2] or parts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or MIN:OPT:MAX with MIN <= OPT <= MAX")
    return tuple(parts)


def _timesteps(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def _add_shape_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    shape = parser.add_argument_group("profile (MIN:OPT:MAX or one value for a static axis; sizes in pixels)")
    shape.add_argument("--batch", type=_range, help="batch size range (default 1:1:4; few-step students run without "
                       "CFG, so 1 is the usual optimum)")
    shape.add_argument("--height", type=_range, help="image height range in pixels (default: the model's own size as "
                       "opt and max, half of it as min, from its config's sample_size x the VAE factor: 512:1024:1024 "
                       "for SDXL, PixArt-1024 and SD3, 256:512:512 for SD1.5; CogVideoX 480, static)")
    shape.add_argument("--width", type=_range, help="image width range in pixels (CogVideoX: 720, static)")
    shape.add_argument("--text-len", type=_range, help="prompt tokens: SDXL/SD1.5 77 (ComfyUI's long prompts use "
                       "multiples of 77, e.g. 77:77:231); PixArt 120; SD3 333 (77 CLIP + 256 T5; ComfyUI gives "
                       "154 for a short prompt); CogVideoX fixed by the model (226)")
    shape.add_argument("--frames", type=int, help="CogVideoX video frames, 4k+1 (default 49), static")


PROVIDERS = ("auto", "cpu", "cuda", "openvino", "openvino-bf16")
PROVIDER_HELP = ("for an ONNX file: ONNX Runtime's CPU or CUDA provider (auto: CUDA when there), or OpenVINO on the "
                 "CPU at f32 or bf16 inference precision (pip install .[openvino])")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = commands.add_parser("onnx", help="export a student to ONNX and check it on ONNX Runtime")
    onnx.add_argument("--model", required=True, help="diffusers pipeline folder (SDXL, SD1.5, PixArt-alpha, "
                      "CogVideoX-2B), or a single-file .safetensors UNet with --config")
    onnx.add_argument("--config", help="pipeline folder with the configs and scheduler of a single-file --model")
    onnx.add_argument("--lora", help="TDM LoRA (.safetensors: our trainer's files, kohya, peft/diffusers) fused "
                      "into the weights")
    onnx.add_argument("--lora-strength", type=float, help="default: the strength the LoRA records (tdm.lora_strength,"
                      " or a known release such as 0.125 for TDM SD3), else 1.0")
    onnx.add_argument("--out-dir", required=True, help="folder for model.onnx, model.opt.onnx and engine.json")
    onnx.add_argument("--force", action="store_true", help="--out-dir holds an export: replace it. The new export is "
                      "written beside it and swapped in only when it validated; a failed one never replaces it")
    onnx.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                      help="precision of the ONNX, hence of a TensorRT engine built from it (strongly typed)")
    onnx.add_argument("--opset", type=int, help="ONNX opset (default 17 with torchscript, 18 with dynamo; 17-20 "
                      "recommended: TensorRT parses the Attention op of 23 only from 10.14)")
    onnx.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                      help="torch.onnx exporter (dynamo= is always passed explicitly)")
    onnx.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                      help="weights in one model.onnx.data file: auto = over 2 GB (or on Windows)")
    onnx.add_argument("--timesteps", type=_timesteps, help="TDM timesteps recorded for the runtime (default: the "
                      "LoRA's tdm.timesteps, else 899,674,449,224; CogVideoX 999,856,665,399)")
    onnx.add_argument("--num-steps", type=int, help="a TDM-unify LoRA (one student for several step counts): the "
                      "step count K to export (required; its c_K is folded in, the grid is K's, and engine.json "
                      "records K: the export is sampled with K steps only)")
    onnx.add_argument("--min-cosine", type=float, help="override the dtype's cosine tolerance")
    onnx.add_argument("--atol", type=float, help="override the dtype's absolute tolerance")
    onnx.add_argument("--threads", type=int, help="ONNX Runtime threads for validation")
    onnx.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where the export is validated: auto = CUDA when onnxruntime-gpu has a GPU (every profile "
                           "corner), else the CPU (a bounded plan: opt shape, smallest size at the largest batch, "
                           "largest size at batch 1)")
    _add_shape_flags(onnx)

    build = commands.add_parser("build", help="build a TensorRT engine from an export (NVIDIA GPU)")
    build.add_argument("--onnx", required=True, help="model.opt.onnx (or its folder, with engine.json)")
    build.add_argument("--out-dir", help="where the engine goes (default: beside the ONNX)")
    build.add_argument("--no-refit", action="store_true", help="build without REFIT (LoRAs can then not be refitted)")
    build.add_argument("--timing-cache", help="timing cache file to read and update (development builds)")
    build.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimization level")
    build.add_argument("--workspace-gb", type=float, help="workspace memory pool limit")
    build.add_argument("--weight-streaming", action="store_true", help="allow streaming weights (small GPUs)")
    _add_shape_flags(build)

    refit = commands.add_parser("refit", help="refit a refittable engine with the weights of another export")
    refit.add_argument("--engine", required=True)
    refit.add_argument("--onnx", required=True, help="the ONNX of the same model with the other LoRA, exported "
                       "with the same exporter, opset and dtype")

    validate = commands.add_parser("validate", help="an ONNX file or engine vs the PyTorch student")
    validate.add_argument("path", help="export folder, .onnx or .engine")
    validate.add_argument("--model", help="base model (default: the one recorded in engine.json)")
    validate.add_argument("--config")
    validate.add_argument("--lora")
    validate.add_argument("--lora-strength", type=float)
    validate.add_argument("--provider", choices=PROVIDERS, default="auto", help=PROVIDER_HELP)
    validate.add_argument("--min-cosine", type=float)
    validate.add_argument("--atol", type=float)

    bench = commands.add_parser("bench", help="PyTorch eager (fp32, bf16 autocast), ONNX Runtime (plain, IO binding), "
                                             "OpenVINO (f32, bf16) and TensorRT engines, in one run")
    bench.add_argument("path", help="export folder")
    bench.add_argument("--model")
    bench.add_argument("--config")
    bench.add_argument("--lora")
    bench.add_argument("--lora-strength", type=float)
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--threads", type=int, help="threads for both PyTorch and ONNX Runtime (default: torch's)")
    bench.add_argument("--json", help="also write the figures here")
    bench.add_argument("--force", action="store_true", help="bench an export whose validation failed")

    generate = commands.add_parser("generate", help="prompt -> image through the exported student")
    generate.add_argument("path", help="export folder, .onnx or .engine")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--out", required=True, help=".png for an image (the base model's VAE decodes), "
                          ".safetensors for the latents")
    generate.add_argument("--model", help="pipeline folder with the text encoders and VAE (default: recorded)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=int, help="pixels (default: the profile's opt)")
    generate.add_argument("--width", type=int)
    generate.add_argument("--eta", type=float, default=0.0, help="0 deterministic; (0, 1] re-noises between steps")
    generate.add_argument("--provider", choices=PROVIDERS, default="auto", help=PROVIDER_HELP)
    generate.add_argument("--force", action="store_true", help="use an export whose validation failed")

    inspect = commands.add_parser("inspect", help="print what an export is")
    inspect.add_argument("path", help="export folder, engine.json, .onnx or .engine")
    return parser


# ----------------------------------------------------------------------------- commands
def _pixels_to_latent(value, factor: int, flag: str):
    if value is None:
        return None
    if any(v % factor or v < 1 for v in value):
        raise BadInput(f"--{flag} {':'.join(map(str, value))}: pixel sizes must be positive multiples of the VAE factor {factor}")
    return tuple(v // factor for v in value)


def cmd_onnx(args) -> int:
    from .families import ExportShapes, family_spec
    from .loading import load_student, vae_scale_factor
    from .onnx_export import Phases, export_onnx

    from tdm_train import atomic

    from .manifest import MANIFEST_NAME
    from .staging import staged_export

    out_dir = Path(args.out_dir)
    atomic.check_writable_folder(out_dir, "--out-dir")
    replacing = (out_dir / MANIFEST_NAME).is_file()
    if replacing and not args.force:
        raise OutputRefused(f"--out-dir {out_dir} holds an export (engine.json): pass --force to replace it (the new "
                            "export is written beside it and swapped in only when it validated), or choose another "
                            "--out-dir")
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    phase = Phases(progress)
    phase.start(f"loading {args.model}" + (f" with the LoRA {args.lora} fused" if args.lora else ""))
    student = load_student(args.model, args.lora, args.lora_strength, args.config, args.timesteps, args.num_steps)
    phase.done(f"{student.family}, grid {student.timesteps}")
    folder = Path(args.model if Path(args.model).is_dir() else args.config)
    factor = vae_scale_factor(folder)
    if student.family == "cogvideox":
        height, width = args.height or (480,) * 3, args.width or (720,) * 3
        frames = args.frames or 49
        if (frames - 1) % 4:
            raise ValueError(f"--frames {frames}: CogVideoX takes 4k+1 frames (49, 33, ...)")
        latent_frames = (frames - 1) // student.model.config.temporal_compression_ratio + 1
        text_len = (student.model.config.max_text_seq_length,) * 3
    else:
        # default profile: the model's own size (its config's sample_size, in latents) as opt and max, half of
        # it as min: SDXL, PixArt-1024, SD3 1024 / 512 px, SD1.5 512 / 256 px at the usual VAE factor 8
        opt = int(getattr(student.model.config, "sample_size", 128)) * factor
        height, width = args.height or (opt // 2, opt, opt), args.width or (opt // 2, opt, opt)
        latent_frames = None
        # one text length for PixArt (T5 at 120) and SD3 (77 CLIP + 256 T5 tokens, as encode_prompt gives them)
        fixed = {"pixart": 120, "sd3": 77 + 256}.get(student.family)
        text_len = args.text_len or ((fixed,) * 3 if fixed else (77,) * 3)
    shapes = ExportShapes(batch=args.batch or (1, 1, 4), height=_pixels_to_latent(height, factor, "height"),
                          width=_pixels_to_latent(width, factor, "width"), text_len=text_len, frames=latent_frames)
    spec = family_spec(student.family, student.model, shapes, args.dtype)
    spec.latent["vae_scale_factor"] = factor
    tolerance = _tolerance(args.dtype, args)
    with staged_export(out_dir, replacing) as target:
        manifest = export_onnx(spec, target, dtype=args.dtype, shapes=shapes,
                               scheduler_config=student.scheduler_config, timesteps=student.timesteps,
                               source=student.source, opset=args.opset, exporter=args.exporter,
                               external_data=args.external_data, tolerance=tolerance, threads=args.threads,
                               num_steps=student.num_steps, unify_steps=student.unify_steps,
                               provider=args.provider, log=progress)
    _print_validation(manifest.validation)
    print(f"wrote {out_dir / 'engine.json'} ({manifest.family}, {manifest.dtype}, "
          f"{manifest.export['nodes_optimized']} nodes after folding)" + (", replacing the previous export"
                                                                        if replacing else ""))
    return 0


def _print_validation(validation: dict) -> None:
    for case in validation.get("cases", []):
        print(f"  {case['shape']}: max |err| {case['max_abs']:.3g}, mean |err| {case['mean_abs']:.3g}, "
              f"cosine {case['cosine']:.6f} -> {'ok' if case['passed'] else 'OUT OF TOLERANCE'}")


def cmd_build(args) -> int:
    import os

    from .manifest import load_manifest
    from .tensorrt_engine import build_engine

    onnx = Path(args.onnx)
    manifest = load_manifest(onnx)
    source_dir = onnx if onnx.is_dir() else onnx.parent
    out_dir = Path(args.out_dir) if args.out_dir else source_dir
    if out_dir.resolve() != source_dir.resolve():  # the engine's manifest points back at the ONNX it came from
        manifest.onnx = os.path.relpath(source_dir / manifest.onnx, out_dir)
        manifest.onnx_unoptimized = os.path.relpath(source_dir / manifest.onnx_unoptimized, out_dir)
        manifest.engines = []
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest.save(out_dir)
    overrides = _profile_overrides(manifest, args)
    path = build_engine(out_dir, profile_overrides=overrides, refit=not args.no_refit,
                        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                        optimization_level=args.opt_level, workspace_gb=args.workspace_gb,
                        weight_streaming=args.weight_streaming)
    print(f"wrote {path}")
    return 0


def _profile_overrides(manifest, args) -> dict | None:
    """--batch/--height/--width (pixels) narrowed within the exported profile."""
    factor = manifest.latent.get("vae_scale_factor", 8)
    height = _pixels_to_latent(args.height, factor, "height")
    width = _pixels_to_latent(args.width, factor, "width")
    if not (args.batch or height or width or args.text_len):
        return None
    axes = manifest.export.get("dynamic_axes", {})
    chosen = {"batch": args.batch, "height": height, "width": width, "text_len": args.text_len}
    overrides = {}
    for spec in manifest.inputs:
        profile = {k: list(v) for k, v in spec.profile.items()}
        for axis, name in axes.get(spec.name, {}).items():
            if chosen.get(name):
                for k, which in enumerate(("min", "opt", "max")):
                    profile[which][int(axis)] = chosen[name][k]
        overrides[spec.name] = profile
    return overrides


def _tolerance(dtype: str, args):
    """The dtype's tolerance with --atol / --min-cosine applied."""
    from .validate import TOLERANCES, Tolerance

    base = TOLERANCES[dtype]
    return Tolerance(atol=args.atol if args.atol is not None else base.atol, rtol=base.rtol,
                     min_cosine=args.min_cosine or base.min_cosine, max_mean_rel=base.max_mean_rel)


def cmd_validate(args) -> int:
    import torch

    from .families import example_inputs, shapes_from_manifest
    from .generate import ExportedStudent
    from .loading import reference_module
    from .onnx_export import validation_plan
    from .manifest import load_manifest
    from .runtime import TorchRunner, open_runner
    from .validate import compare

    manifest = load_manifest(args.path)
    runner = open_runner(args.path, args.provider)
    reference = TorchRunner(reference_module(manifest, args.model, args.lora, args.lora_strength, args.config),
                            manifest)
    # reduced precision is judged by statistics (cosine, mean error), as fp16 exports are
    tolerance = _tolerance("bf16" if args.provider == "openvino-bf16" else manifest.dtype, args)
    axes = manifest.export.get("dynamic_axes", {})
    failed = False
    generator = torch.Generator().manual_seed(0)
    on_gpu = runner.kind == "TensorRT" or getattr(runner, "provider", "cpu") == "cuda"
    points, plan = validation_plan(shapes_from_manifest(manifest), "cuda" if on_gpu else "cpu")
    print(f"  shapes: {plan}")
    for point in points:
        feeds = example_inputs(manifest.inputs, axes, point, generator)
        stats = compare(reference(**feeds), runner(**feeds))
        problems = stats.failures(tolerance)
        failed |= bool(problems)
        print(f"  call at {point}: max |err| {stats.max_abs:.3g}, cosine {stats.cosine:.6f} -> "
              f"{'; '.join(problems) or 'ok'}")
    # a whole generation: per-step error compounds through the trajectory
    from .bench import CONDITION_OF_INPUT
    from .families import opt_point

    feeds = example_inputs(manifest.inputs, axes, opt_point(manifest), generator)
    cond = {CONDITION_OF_INPUT[k]: v.float() for k, v in feeds.items() if k in CONDITION_OF_INPUT}
    noise = torch.randn(feeds["sample"].shape, generator=generator)
    stats = compare(ExportedStudent(reference).generate(cond, noise), ExportedStudent(runner).generate(cond, noise))
    problems = stats.failures(tolerance)
    failed |= bool(problems)
    print(f"  {len(manifest.timesteps)}-step generation: max |err| {stats.max_abs:.3g}, cosine {stats.cosine:.6f} -> "
          f"{'; '.join(problems) or 'ok'}")
    print(f"{runner.kind} {'FAILED' if failed else 'passed'} ({manifest.dtype}, tolerance {vars(tolerance)})")
    return EXIT_TOLERANCE if failed else 0


def cmd_bench(args) -> int:
    import torch

    from .bench import compare_runtimes, format_table
    from .loading import reference_module
    from .manifest import load_manifest
    from .deps import MissingDependency
    from .runtime import OPENVINO_PRECISIONS, OnnxRuntimeRunner, OpenVINORunner, TorchRunner, instruction_sets

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    folder = Path(args.path)
    manifest = load_manifest(folder)
    manifest.refuse_if_unvalidated(str(folder), args.force)
    folder = folder if folder.is_dir() else folder.parent
    module = reference_module(manifest, args.model, args.lora, args.lora_strength, args.config)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[manifest.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # PyTorch eager has no fast fp16 on the CPU: compare with its fp32
    runners = {f"PyTorch eager ({device}, {str(dtype).removeprefix('torch.')})": TorchRunner(module.to(device, dtype),
                                                                                            manifest)}
    if device == "cpu":  # PyTorch's best CPU option: bf16 autocast (AMX / AVX-512 bf16 where the CPU has them)
        runners["PyTorch eager (cpu, bf16 autocast)"] = TorchRunner(module, manifest, autocast=torch.bfloat16)
    runners[f"ONNX Runtime CPU ({manifest.dtype})"] = OnnxRuntimeRunner(folder / manifest.onnx, manifest, "cpu",
                                                                        threads=threads, allow_spinning=False)
    runners[f"ONNX Runtime CPU ({manifest.dtype}), IO binding"] = OnnxRuntimeRunner(
        folder / manifest.onnx, manifest, "cpu", threads=threads, allow_spinning=False, io_binding=True)
    for precision in OPENVINO_PRECISIONS:
        try:
            runners[f"OpenVINO CPU ({precision})"] = OpenVINORunner(folder / manifest.onnx, manifest, precision, threads)
        except MissingDependency as error:  # not installed, or no bf16 units: reported, not fatal
            print(f"skipping OpenVINO {precision}: {error}", file=sys.stderr)
    print(instruction_sets(), file=sys.stderr)
    for engine in manifest.engines:
        try:
            from .runtime import open_runner

            runners[f"TensorRT {engine.get('tensorrt', '')}"] = open_runner(folder / engine["file"])
        except Exception as error:  # an engine for another GPU / TensorRT is reported, not fatal
            print(f"skipping engine {engine['file']}: {error}", file=sys.stderr)
    result = compare_runtimes(runners, repeats=args.repeats)
    print(format_table(result))
    if args.json:
        from tdm_train import atomic

        atomic.write_text(args.json, json.dumps(result, indent=2))
    return 0


def cmd_generate(args) -> int:
    import torch

    from tdm_train.training.teachers import add_sdxl_time_ids, encode_prompts

    from .generate import ExportedStudent, decode_latents
    from .manifest import load_manifest
    from .runtime import open_runner

    from tdm_train import atomic

    out = Path(args.out)
    if out.suffix != ".safetensors":
        from PIL import Image

        if out.suffix.lower() not in Image.registered_extensions():
            raise BadInput(f"--out {out}: .png (or another image format PIL writes) for an image, .safetensors for "
                           "the latents")
    atomic.check_writable_folder(out.parent, "--out's folder")
    manifest = load_manifest(args.path)
    manifest.refuse_if_unvalidated(str(args.path), args.force)
    folder = Path(args.model or manifest.source.get("config", ""))
    if not (folder / "model_index.json").is_file():
        raise BadInput("generate needs the base pipeline folder (text encoders, VAE): pass --model")
    factor = manifest.latent.get("vae_scale_factor", 8)
    student = ExportedStudent(open_runner(args.path, args.provider))
    height, width = (_pixels_to_latent((value,), factor, flag)[0] if value else None
                     for value, flag in ((args.height, "height"), (args.width, "width")))
    shape = student.latent_shape(1, height, width)
    if manifest.family == "sd15":
        raise ValueError("generate encodes prompts for SDXL, PixArt, CogVideoX and SD3 exports; sample SD1.x engines "
                         "in ComfyUI with the TDM Engine Loader")
    cond, _ = encode_prompts(folder, manifest.family, [args.prompt])
    if manifest.family == "sdxl":
        cond = add_sdxl_time_ids(cond, shape[-1] * factor)
    cond = student.fit_text_length(cond)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    latents = student.generate(cond, noise, eta=args.eta, generator=torch.Generator().manual_seed(args.seed + 1))
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise NonFinite(f"the {student.runner.kind} student produced {bad} of {latents.numel()} non-finite latent "
                        f"values: nothing was written to {args.out}. Validate the export (python -m export.trt "
                        f"validate {args.path}); an fp16 export that overflows needs --dtype fp32")

    if out.suffix == ".safetensors":
        atomic.save_safetensors({"latents": latents}, out, {"prompt": args.prompt, "seed": str(args.seed)})
    else:
        from PIL import Image

        image = decode_latents(folder, latents, manifest.family)[0]
        if image.dim() == 4:
            image = image[0]  # first frame of a video
        with atomic.atomic_path(out) as tmp:
            Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(tmp)
    unify = f", the K={manifest.num_steps} TDM-unify student" if manifest.num_steps is not None else ""
    print(f"wrote {out} ({student.runner.kind}, {len(manifest.timesteps)} steps {manifest.timesteps}{unify})")
    return 0


def cmd_inspect(args) -> int:
    from .deps import MissingDependency
    from .graph import onnx_summary
    from .manifest import load_manifest, manifest_path

    manifest = load_manifest(args.path)
    folder = manifest_path(args.path).parent
    print(manifest.to_json(), end="")
    damaged = None
    try:
        summary = onnx_summary(folder / manifest.onnx)
        print(f"# {manifest.onnx}: opset {summary['opset']}, {summary['nodes']} nodes, inputs {summary['inputs']}, "
              f"outputs {summary['outputs']}")
    except IncompatibleFile as error:
        damaged = error
    except (MissingDependency, FileNotFoundError, OSError) as error:
        print(f"# {manifest.onnx}: not readable here ({error})")
    for engine in manifest.engines:
        present = (folder / engine["file"]).is_file()
        print(f"# engine {engine['file']}: TensorRT {engine.get('tensorrt')}, sm{engine.get('compute_capability')}, "
              f"refit {engine.get('refit')}, {'present' if present else 'MISSING'}")
    if damaged is not None:
        raise damaged  # exit 3, after everything else about the export was printed
    if manifest.validation_failed:
        print(f"# validation FAILED at export: {manifest.validation.get('error') or 'out of tolerance'}")
    return 0


def cmd_refit(args) -> int:
    from .tensorrt_engine import refit_engine

    count = refit_engine(Path(args.engine), Path(args.onnx))
    print(f"refitted {count} weights of {args.engine}")
    return 0


COMMANDS = {"onnx": cmd_onnx, "build": cmd_build, "refit": cmd_refit, "validate": cmd_validate, "bench": cmd_bench,
            "generate": cmd_generate, "inspect": cmd_inspect}


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Runs a command; every error the input explains is one ``error:`` paragraph and its exit code."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
