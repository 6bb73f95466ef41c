"""TDM Export Engine and TDM Engine Loader: a MODEL as loaded (LoRA merged) to ONNX and a TensorRT
engine under ``models/tensorrt``, and back into a MODEL for the TDM sampler — with no model-type
dropdown: the family, schedule and shapes come from the export's engine.json."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import folder_paths
from export.families import DTYPES, ExportShapes
from export.manifest import MANIFEST_NAME
from tdm_train.lora.step_embedding import applied
from tdm_train.timesteps import tdm_timesteps, validate_timesteps

from .step_condition import APPLY_MODEL, WRAPPER_KEY, FixedStepsWrapper, attached
from .v3_api import io, ui

CATEGORY = "TDM/export"
FOLDER = "tensorrt"
EXTENSIONS = {".engine", ".plan", ".onnx"}
OPTIMIZED_ONNX = "model.opt.onnx"


def register_engine_folder() -> None:
    """``models/tensorrt`` (ComfyUI_TensorRT's folder) listing engines and exported ONNX files."""
    folder_paths.add_model_folder_path(FOLDER, str(Path(folder_paths.models_dir) / FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | EXTENSIONS)


def exported_files() -> list[str]:
    """Engines and optimized ONNX files that have an engine.json beside them."""
    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        path = folder_paths.get_full_path(FOLDER, name)
        if path is None or not (Path(path).parent / MANIFEST_NAME).is_file():
            continue
        if Path(path).parent.suffix in (".partial", ".failed", ".previous"):  # staging.py's side folders
            continue
        if Path(name).suffix in (".engine", ".plan") or Path(name).name == OPTIMIZED_ONNX:
            names.append(name)
    return sorted(names)


def output_folder(name: str) -> Path:
    """models/tensorrt/<name>, refusing names that leave it (absolute paths, '..')."""
    root = Path(folder_paths.get_folder_paths(FOLDER)[0]).resolve()
    if not name.strip() or Path(name).is_absolute():
        raise ValueError(f"TDM Export Engine: name {name!r} must be a relative folder name under {root}")
    folder = (root / name).resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise ValueError(f"TDM Export Engine: refusing {name!r}: it resolves to {folder}, outside {root}")
    return folder


def unify_export(model, num_steps: int, grid: list[int]):
    """For a MODEL that carries a TDM-unify step condition (TDM LoRA Loader): (K, trained K, grid,
    the context that applies c_K while the network is traced, a note). ``num_steps`` 0 takes the
    largest trained K; a grid of another length than K becomes K's uniform grid. Other models:
    (None, None, grid, no-op, None); a num_steps for them is refused."""
    wrapper = attached(model.wrappers)
    if wrapper is None:
        if num_steps:
            raise ValueError(f"TDM Export Engine: num_steps {num_steps} is for a TDM-unify model (a LoRA trained for "
                             "several step counts, loaded by the TDM LoRA Loader); set it to 0 for this MODEL")
        return None, None, grid, contextlib.nullcontext(), None
    k = int(num_steps) or max(wrapper.steps)
    wrapper.accept(k)  # an untrained K: refused with the trained list
    note = f"TDM-unify student exported for K = {k} (c_{k} folded in; trained for {wrapper.steps})"
    if len(grid) != k:
        grid = tdm_timesteps(k)
        note += f"; timesteps: the {k}-step grid {grid}"
    hook = applied(model.model.diffusion_model, wrapper.conditions, k, wrapper.conditions.comfy_target)
    return k, wrapper.steps, grid, hook, note


def _range(low: int, opt: int, high: int, what: str) -> tuple[int, int, int]:
    if not low <= opt <= high:
        raise ValueError(f"TDM Export Engine: {what} needs min <= opt <= max, got {low} / {opt} / {high}")
    return low, opt, high


class TDMExportEngine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        size = dict(min=64, max=4096, step=64)
        return io.Schema(
            node_id="TDMExportEngine",
            display_name="TDM Export Engine",
            category=CATEGORY,
            description="Exports the MODEL as loaded (LoRA patches merged) to ONNX under models/tensorrt/<name>, "
                        "checks it on ONNX Runtime against PyTorch, writes engine.json, and builds a refittable "
                        "TensorRT engine (NVIDIA GPU with TensorRT installed). SDXL and SD1.x/2.x models.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("name", default="tdm_student", tooltip="folder under models/tensorrt"),
                io.Combo.Input("dtype", options=["fp16", "fp32"], default="fp16"),
                io.Int.Input("batch_max", default=2, min=1, max=64, tooltip="largest batch (2 = cond + uncond)"),
                io.Int.Input("height_min", default=512, **size),
                io.Int.Input("height_opt", default=1024, **size),
                io.Int.Input("height_max", default=1024, **size),
                io.Int.Input("width_min", default=512, **size),
                io.Int.Input("width_opt", default=1024, **size),
                io.Int.Input("width_max", default=1024, **size),
                io.Int.Input("context_max", default=77, min=77, max=77 * 16, step=77,
                             tooltip="prompt tokens (ComfyUI adds 77 per long-prompt chunk)"),
                io.String.Input("timesteps", default="899, 674, 449, 224",
                                tooltip="the student's trained timesteps, recorded in engine.json"),
                io.Boolean.Input("build_tensorrt_engine", default=True,
                                 tooltip="off: ONNX only (runs on ONNX Runtime; no GPU needed)"),
                io.Int.Input("num_steps", default=0, min=0, max=8,
                             tooltip="a TDM-unify MODEL (its LoRA trained for several step counts): the K the "
                                     "engine is for, sampled with K steps only; 0 = the largest trained K. "
                                     "Leave 0 for other models"),
            ],
            outputs=[io.String.Output("export_folder", display_name="export_folder")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, name, dtype, batch_max, height_min, height_opt, height_max, width_min, width_opt,
                width_max, context_max, timesteps, build_tensorrt_engine, num_steps=0) -> io.NodeOutput:
        import comfy.model_management
        from export.deps import require_tensorrt
        from export.onnx_export import export_onnx
        from export.staging import staged_export

        from .engine_models import comfy_family_spec, comfy_scheduler_config, exportable
        from .patchers import classic_patcher

        register_engine_folder()
        folder = output_folder(name)
        grid = validate_timesteps([int(t) for t in timesteps.replace(" ", "").split(",") if t] or tdm_timesteps(4))
        k, unify_steps, grid, step_condition, note = unify_export(model, num_steps, grid)
        if build_tensorrt_engine:
            require_tensorrt()  # before minutes of export, not after
        heights = _range(height_min, height_opt, height_max, "height")
        widths = _range(width_min, width_opt, width_max, "width")
        shapes = ExportShapes(batch=(1, 1, batch_max), height=tuple(h // 8 for h in heights),
                              width=tuple(w // 8 for w in widths), text_len=(77, 77, context_max))
        model = classic_patcher(model, "TDM Export Engine")  # merged weights in memory (ComfyUI 0.38: not dynamic)
        comfy.model_management.unload_all_models()
        comfy.model_management.load_models_gpu([model], force_patch_weights=True, force_full_load=True)
        spec = comfy_family_spec(model, shapes, dtype)
        # re-running the node replaces its export, but only with one that validated (export/staging.py)
        with exportable(model.model.diffusion_model, DTYPES[dtype]), step_condition, \
                staged_export(folder, (folder / MANIFEST_NAME).is_file()) as target:
            manifest = export_onnx(spec, target, dtype=dtype, shapes=shapes, scheduler_config=comfy_scheduler_config(model),
                                   timesteps=grid, signature="comfyui",
                                   source={"comfyui_model": type(model.model.model_config).__name__,
                                           "patches": len(model.patches)},
                                   num_steps=k, unify_steps=unify_steps,
                                   log=lambda line: logging.info("TDM Export Engine: %s", line.strip()))
        lines = [f"{folder}: {manifest.family} {dtype} ONNX, ONNX Runtime vs PyTorch max |error| "
                 f"{max(c['max_abs'] for c in manifest.validation['cases']):.3g}"]
        if note:
            lines.append(note)
        if build_tensorrt_engine:
            from export.tensorrt_engine import build_engine

            lines.append(f"engine: {build_engine(folder).name}")
        summary = "\n".join(lines)
        logging.info("TDM Export Engine: %s", summary.replace("\n", "; "))
        return io.NodeOutput(str(folder), ui=ui.PreviewText(summary))


class TDMEngineLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_engine_folder()
        return io.Schema(
            node_id="TDMEngineLoader",
            display_name="TDM Engine Loader",
            category=CATEGORY,
            description="Loads an exported TDM student (TensorRT .engine, or model.opt.onnx on ONNX Runtime) as a "
                        "MODEL for the TDM sampler. Family, schedule and shapes come from its engine.json.",
            inputs=[
                io.Combo.Input("engine_name", options=exported_files()),
                io.Combo.Input("onnx_provider", options=["auto", "cpu", "cuda", "openvino", "openvino-bf16"],
                               default="auto",
                               tooltip="ONNX files only: ONNX Runtime's execution provider, or OpenVINO on the CPU "
                                       "(f32, or bf16 on CPUs with bf16 units; pip install openvino)"),
                io.Boolean.Input("allow_failed_validation", default=False, optional=True,
                                 tooltip="load an export whose engine.json says its validation failed (its outputs "
                                         "are not trusted: normally it is refused)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, engine_name, onnx_provider, allow_failed_validation=False) -> io.NodeOutput:
        import comfy.model_management
        from export.manifest import load_manifest
        from export.runtime import open_runner

        from .engine_models import comfy_model

        register_engine_folder()
        path = Path(folder_paths.get_full_path_or_raise(FOLDER, engine_name))
        manifest = load_manifest(path)
        manifest.refuse_if_unvalidated(f"TDM Engine Loader: {engine_name}", allow_failed_validation,
                                       "allow_failed_validation")
        runner = open_runner(path, onnx_provider)  # TensorRT deserializes lazily, at the first step
        if path.suffix == ".onnx" and getattr(runner, "provider", "cpu") == "cpu":  # ONNX Runtime CPU, OpenVINO
            device = comfy.model_management.intermediate_device()
        else:
            device = comfy.model_management.get_torch_device()
        model = comfy_model(runner, manifest, device, comfy.model_management.unet_offload_device())
        summary = (f"{engine_name}: {manifest.family} {manifest.dtype} ({runner.kind}), "
                   f"{runner.memory_bytes / 2**20:.1f} MiB, timesteps {manifest.timesteps}")
        if manifest.num_steps is not None:  # the TDM samplers are refused another step count
            model.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY,
                                       FixedStepsWrapper(manifest.num_steps, manifest.unify_steps or [], engine_name))
            summary += (f"\nTDM-unify student exported for K = {manifest.num_steps} (trained for "
                        f"{manifest.unify_steps}): sample it with {manifest.num_steps} steps")
        return io.NodeOutput(model, ui=ui.PreviewText(summary))


NODES = [TDMExportEngine, TDMEngineLoader]
