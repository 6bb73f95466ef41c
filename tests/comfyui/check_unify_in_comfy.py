"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): a TDM-unify LoRA through the TDM
LoRA Loader on a real ComfyUI MODEL (the tiny SD1.5 checkpoint of make_tiny_models.py), sampled
by ComfyUI's own guider / KSAMPLER machinery. Prints one JSON object.

    python check_unify_in_comfy.py PACK_ROOT MODELS_DIR WORK_DIR
"""

import json
import logging
import sys
from pathlib import Path

PACK_ROOT, MODELS, WORK = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from pack_loader import load_pack  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

STEPS = (1, 2, 4)
TARGET = "time_embed.2"


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def lora_files(dim: int):
    """The same LoRA weights twice, kohya-named (as SDXL files are): plain, and with a step condition."""
    from tdm_train.lora.step_embedding import StepConditions

    generator = torch.Generator().manual_seed(0)
    lora = {}
    for proj in ("to_q", "to_k", "to_v"):
        base = f"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_{proj}"
        lora[f"{base}.lora_down.weight"] = torch.randn(4, 320, generator=generator) * 0.05
        lora[f"{base}.lora_up.weight"] = torch.randn(320, 4, generator=generator) * 0.05
        lora[f"{base}.alpha"] = torch.tensor(4.0)
    conditions = StepConditions.for_family("sd15", {k: torch.randn(dim, generator=generator) * 0.5 for k in STEPS})
    folder = WORK / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(folder / "plain.safetensors"))
    save_file({**lora, **conditions.tensors()}, str(folder / "unify.safetensors"), metadata=conditions.metadata())
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return conditions


def main():
    lora_node = load_pack(PACK_ROOT, "nodes.lora")  # puts the pack root on sys.path
    sampling = load_pack(PACK_ROOT, "nodes.sampling")
    from tdm_train.lora.step_embedding import applied

    messages = Messages()
    logging.getLogger().addHandler(messages)
    logging.getLogger().setLevel(logging.INFO)

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(MODELS / "checkpoints" / "tiny_sd15.safetensors"), output_vae=True, output_clip=True)
    model.set_model_compute_dtype(torch.float32)
    diffusion_model = model.model.diffusion_model
    conditions = lora_files(diffusion_model.get_submodule(TARGET).out_features)
    out = {}

    messages.lines.clear()
    unify, summary = lora_node.apply_tdm_lora(model, "unify.safetensors", "manual", 1.0)
    out["summary"] = summary
    out["not_loaded_messages"] = [m for m in messages.lines if "not loaded" in m]
    plain, _ = lora_node.apply_tdm_lora(model, "plain.safetensors", "manual", 1.0)
    out["patches"] = [len(unify.patches), len(plain.patches)]
    out["wrapper_keys"] = {"unify": sorted(unify.wrappers.get("apply_model", {})),
                           "plain": sorted(plain.wrappers.get("apply_model", {})),
                           "loader_input": sorted(model.wrappers.get("apply_model", {}))}
    clone = unify.clone()
    out["clone_keeps_it"] = sorted(clone.wrappers.get("apply_model", {}))

    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of a cat"))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def ksampler(patched, steps, denoise=1.0, image=None):
        source = latent if image is None else {"samples": image}
        result = sampling.TDMKSampler.execute(patched, positive, source, 7, "tdm_uniform", steps, 900, 6.0, "",
                                              0.0, 1.0, denoise)
        return result.args[0]["samples"].float()

    def hooks():
        return len(diffusion_model.get_submodule(TARGET)._forward_hooks)

    # TDM KSampler, 2 steps: the student with c_2 (the library's hook on the same layer) and nothing left over
    got = ksampler(unify, 2)
    out["hooks_after_sampling"] = hooks()
    with applied(diffusion_model, conditions, 2, TARGET):
        reference = ksampler(plain, 2)
    out["ksampler_k2_vs_reference"] = float((got - reference).abs().max())
    out["ksampler_k2_vs_no_condition"] = float((got - ksampler(plain, 2)).abs().max())
    with applied(diffusion_model, conditions, 4, TARGET):
        out["ksampler_k2_vs_c4"] = float((got - ksampler(plain, 2)).abs().max())
    out["scale"] = float(reference.abs().max())

    # TDM Sampler via ComfyUI's SamplerCustom path (comfy.sample.sample_custom), 4 steps
    sigmas = sampling._sigmas(unify, "tdm_uniform", 4, 900, 6.0, "", 1.0)
    noise = comfy.sample.prepare_noise(latent["samples"], 3)

    def custom(patched, sampler, sigmas_):
        return comfy.sample.sample_custom(patched, noise, 1.0, sampler, sigmas_, positive, [], latent["samples"],
                                          seed=3).float()

    got = custom(unify, sampling.tdm_sampler(0.0), sigmas)
    with applied(diffusion_model, conditions, 4, TARGET):
        reference = custom(plain, sampling.tdm_sampler(0.0), sigmas)
    out["sampler_custom_k4_vs_reference"] = float((got - reference).abs().max())
    out["hooks_after_sampler_custom"] = hooks()

    # an untrained K: refused with the trained list, before any step, and nothing left registered
    try:
        ksampler(unify, 3)
        out["untrained_error"] = None
    except ValueError as error:
        out["untrained_error"] = str(error)
    out["hooks_after_refusal"] = hooks()

    # a stock sampler (euler) does not say K: the largest trained K, with a warning
    messages.lines.clear()
    euler = comfy.samplers.ksampler("euler")
    got = custom(unify, euler, sigmas)
    with applied(diffusion_model, conditions, 4, TARGET):
        reference = custom(plain, euler, sigmas)
    out["euler_vs_c4"] = float((got - reference).abs().max())
    out["euler_warnings"] = [m for m in messages.lines if "does not say its step count" in m]

    # img2img, denoise 0.5 on the 4-step grid (449, 224 remain): the student is the 4-step one
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5
    got = ksampler(unify, 4, 0.5, image)
    with applied(diffusion_model, conditions, 4, TARGET):
        reference = ksampler(plain, 4, 0.5, image)
    with applied(diffusion_model, conditions, 2, TARGET):
        as_two = ksampler(plain, 4, 0.5, image)
    out["img2img_vs_c4"] = float((got - reference).abs().max())
    out["img2img_vs_c2"] = float((got - as_two).abs().max())

    out["hooks_at_end"] = hooks()

    # TDM Export Engine on the unify MODEL at K = 2 (ONNX only), back through the TDM Engine Loader
    engines = load_pack(PACK_ROOT, "nodes.engines")
    folder_paths.add_model_folder_path("tensorrt", str(WORK / "tensorrt"), is_default=True)
    exported = engines.TDMExportEngine.execute(unify, "unify_k2", "fp32", 1, 64, 64, 64, 64, 64, 64, 77,
                                               "899, 674, 449, 224", False, 2)
    out["export_summary"] = exported.ui.as_dict()["text"][0] if hasattr(exported.ui, "as_dict") else str(exported.ui)
    manifest = json.loads((WORK / "tensorrt" / "unify_k2" / "engine.json").read_text())
    out["manifest"] = {k: manifest[k] for k in ("num_steps", "unify_steps", "timesteps")}
    out["hooks_after_export"] = hooks()
    engine, = engines.TDMEngineLoader.execute("unify_k2/model.opt.onnx", "cpu").args
    out["engine_vs_pytorch_k2"] = float((ksampler(engine, 2) - ksampler(unify, 2)).abs().max())
    try:
        ksampler(engine, 4)
        out["engine_other_k_error"] = None
    except ValueError as error:
        out["engine_other_k_error"] = str(error)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
