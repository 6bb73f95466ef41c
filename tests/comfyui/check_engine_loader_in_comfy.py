"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): exported students (made beforehand
by the test with diffusers) become ComfyUI MODELs through the TDM Engine Loader's code, and
ComfyUI's own apply_model on them gives the exported network's x0. Prints one JSON object.

    python check_engine_loader_in_comfy.py PACK_ROOT EXPORT_DIR [EXPORT_DIR ...]
"""

import json
import sys
from pathlib import Path

PACK_ROOT, EXPORTS = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from pack_loader import load_pack  # noqa: E402

import comfy.model_management  # noqa: E402


def check(engine_models, folder: Path) -> dict:
    from export.generate import ExportedStudent
    from export.manifest import load_manifest
    from export.runtime import open_runner
    from tdm_train.schedule import NoiseSchedule

    manifest = load_manifest(folder)
    runner = open_runner(folder, provider="cpu")
    cpu = torch.device("cpu")
    patcher = engine_models.comfy_model(runner, manifest, cpu, cpu)
    base = patcher.model
    comfy.model_management.load_models_gpu([patcher])

    schedule = NoiseSchedule.from_diffusers_config(manifest.scheduler_config)
    flow = manifest.family == "sd3"  # ComfyUI's flow sigma is sigma_t itself; VP models' is sigma_t / alpha_t
    ours = torch.tensor([float(schedule.sigmas[t] / (1 if flow else schedule.alphas[t])) for t in manifest.timesteps])
    theirs = base.model_sampling.sigmas.double()[torch.tensor(manifest.timesteps)]  # the table the scheduler reads

    gen = torch.Generator().manual_seed(0)
    sample = manifest.input("sample").profile["opt"]
    text = manifest.input("encoder_hidden_states").profile["opt"]
    x = torch.randn(sample, generator=gen) * 8
    sigma = torch.full((sample[0],), float(ours[0]))
    tokens = text[1] - 6 if manifest.family == "pixart" else text[1]  # ComfyUI's T5 states are unpadded
    context = torch.randn(sample[0], tokens, text[2], generator=gen)
    extra, cond = {}, {}
    if manifest.family == "sdxl":
        extra["y"] = cond["add_embeds"] = torch.randn(sample[0], manifest.input("add_embeds").shape[1], generator=gen)
        cond["prompt_embeds"] = context
    elif flow:
        extra["y"] = cond["pooled_prompt_embeds"] = torch.randn(sample[0], manifest.input("pooled_projections").shape[1],
                                                                generator=gen)
        cond["prompt_embeds"] = context
    elif manifest.family == "pixart":
        height, width = sample[2] * 8.0, sample[3] * 8.0
        extra["c_size"], extra["c_ar"] = torch.tensor([[height, width]]), torch.tensor([[height / width]])
        cond["prompt_embeds"] = torch.nn.functional.pad(context, (0, 0, 0, text[1] - tokens))
        cond["prompt_attention_mask"] = torch.cat([torch.ones(sample[0], tokens), torch.zeros(sample[0], text[1] - tokens)], 1)
    with torch.no_grad():
        denoised = base.apply_model(x, sigma, c_crossattn=context, **extra)  # ComfyUI's x0 (calculate_denoised)
        t = torch.full((sample[0],), manifest.timesteps[0])
        state = x if flow else x / (1 + sigma[0] ** 2).sqrt()  # the library's x_t (flow: x_t itself)
        expected = ExportedStudent(runner).x0(state, t, cond)
    openvino = None
    try:  # the TDM Engine Loader's onnx_provider "openvino": the same ComfyUI model over OpenVINO (CPU)
        ov_patcher = engine_models.comfy_model(open_runner(folder, provider="openvino"), manifest, cpu, cpu)
        comfy.model_management.load_models_gpu([ov_patcher])
        with torch.no_grad():
            openvino = float((ov_patcher.model.apply_model(x, sigma, c_crossattn=context, **extra) - denoised).abs().max())
    except ImportError:
        pass
    return {
        "openvino_vs_onnxruntime": openvino,
        "family": manifest.family,
        "comfy_class": type(base).__name__,
        "sigma_max_rel_diff": float(((theirs - ours) / ours).abs().max()),
        "x0_max_abs_diff": float((denoised - expected).abs().max()),
        "x0_scale": float(expected.abs().max()),
        "model_size": patcher.model_size(),
        "runner_bytes": runner.memory_bytes,
        "memory_required": base.memory_required([1, 4, 8, 8]),
    }


def main() -> None:
    engine_models = load_pack(PACK_ROOT, "nodes.engine_models")
    print(json.dumps({str(folder): check(engine_models, folder) for folder in EXPORTS}))


main()
