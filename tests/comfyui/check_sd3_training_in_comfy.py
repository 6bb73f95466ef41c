"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): TDM Train LoRA on a real ComfyUI SD3.5
MODEL (a reduced-depth SD3.5-shaped transformer that ComfyUI's model detection recognises, loaded
by ComfyUI from the file the test writes), then the saved LoRA through the TDM LoRA Loader and the
TDM KSampler on the trained grid. Prints one JSON object.

The CLIP is a stand-in that returns SD3-shaped conditioning (states + pooled_output) per prompt:
ComfyUI builds SD3's text encoders (CLIP-L, CLIP-G, T5-XXL) at full size only, which a CPU test
cannot hold; everything after the text encoder is ComfyUI's own (extra_conds, model_sampling,
apply_model, weight wrappers, LoRA key map, samplers).

    python check_sd3_training_in_comfy.py PACK_ROOT WORK_DIR   (WORK_DIR/tiny_sd35.safetensors)
"""

import hashlib
import json
import logging
import sys
from pathlib import Path

PACK_ROOT, WORK = Path(sys.argv[1]), Path(sys.argv[2])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from pack_loader import load_pack  # noqa: E402
from safetensors import safe_open  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402


class StandInSD3Clip:
    """tokenize / encode_from_tokens_scheduled with SD3's output layout: [[states [1, L, D], {"pooled_output":
    [1, P]}]], the same tensors for the same text."""

    def __init__(self, width: int, pooled: int):
        self.width, self.pooled = width, pooled

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        seed = int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 7, self.width, generator=gen), {"pooled_output": torch.randn(1, self.pooled, generator=gen)}]]


def main():
    training = load_pack(PACK_ROOT, "nodes.training")
    lora_node = load_pack(PACK_ROOT, "nodes.lora")
    sampling = load_pack(PACK_ROOT, "nodes.sampling")
    (WORK / "loras").mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(WORK / "loras"), is_default=True)
    folder_paths.set_output_directory(str(WORK / "output"))
    model = comfy.sd.load_diffusion_model(str(WORK / "tiny_sd35.safetensors"))
    unet_config = model.model.model_config.unet_config
    clip = StandInSD3Clip(unet_config["context_embedder_config"]["params"]["in_features"], unet_config["adm_in_channels"])
    out = {"type": type(model.model).__name__, "family": load_pack(PACK_ROOT, "nodes.comfy_trainer").training_family(model)}

    result = training.TDMTrainLoRA.execute(
        model, clip, "a red cat\na blue dog", "(none)", "", 64, 64, 3, 1, 1e-3, 1e-3, 4, 8.0, "tdm_uniform", 4,
        "899, 674, 449, 224", 0.0, "mse", "separate", "", 0, False, "fp32", "tiny_sd35_tdm", False, 100)
    student, lora_state, _curve, lora_path = result.args
    out["summary"] = result.ui.as_dict()["text"][0]
    with safe_open(lora_path, "pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
    out["timesteps"] = json.loads(meta["tdm.timesteps"])
    out["training_cfg"] = meta.get("tdm.training_cfg")
    out["modules"] = sorted({k.split("diffusion_model.", 1)[1].rsplit(".", 2)[0] for k in keys if k.endswith("lora_up.weight")})

    not_loaded = []
    handler = type("H", (logging.Handler,), {"emit": lambda self, r: not_loaded.append(r.getMessage())})()
    logging.getLogger().addHandler(handler)
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(lora_path), comfy.lora.model_lora_keys_unet(model.model, {}))
    out["patched"] = len(patches)
    loaded, summary = lora_node.apply_tdm_lora(model, Path(lora_path).name, "recorded", 0.5)
    logging.getLogger().removeHandler(handler)
    out["not_loaded"] = [m for m in not_loaded if "lora key not loaded" in m]
    out["loader_summary"] = summary

    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red cat"))
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    sigmas = sampling.TDMScheduler.execute(model, "tdm_uniform", 4, 1000, 6.0, "", 1.0).args[0]
    out["sigmas"] = [round(float(s), 6) for s in sigmas]
    # preset "recorded": the grid the LoRA on the MODEL was trained on (loader and trainer outputs alike)
    out["recorded_sigmas"] = {name: [round(float(s), 6) for s in sampling.TDMScheduler.execute(
        patched, "recorded", 4, 900, 6.0, "", 1.0).args[0]] for name, patched in (("loader", loaded), ("trainer", student))}
    try:
        sampling.TDMScheduler.execute(model, "recorded", 4, 900, 6.0, "", 1.0)
        out["recorded_on_base"] = "accepted"
    except ValueError as error:
        out["recorded_on_base"] = str(error)

    def ksampler(patched):
        return sampling.TDMKSampler.execute(patched, positive, latent, 7, "tdm_uniform", 4, 1000, 6.0, "",
                                            0.0, 1.0, 1.0).args[0]["samples"].float()

    base, from_node, from_file = ksampler(model), ksampler(student), ksampler(loaded)
    out["finite"] = bool(torch.isfinite(from_node).all())
    out["student_vs_base"] = float((from_node - base).abs().max())
    out["student_vs_loaded"] = float((from_node - from_file).abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
