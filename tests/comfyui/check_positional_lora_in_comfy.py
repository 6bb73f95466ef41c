"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): the official TDM SD3.5-Medium LoRA's
layout (a .ckpt holding a positional ``ema_parameters`` list) through the TDM LoRA Loader on real
ComfyUI SD3 / SD3.5 MODELs, loaded by ComfyUI from tiny diffusers transformers. Each patched model
is compared, weight by weight, with the model ComfyUI loads from the merged reference (W + alpha/r
B A, written by the test). Prints one JSON object.

    python check_positional_lora_in_comfy.py PACK_ROOT WORK_DIR   (WORK_DIR/cases.json from the test)
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

PACK_ROOT, WORK = Path(sys.argv[1]), Path(sys.argv[2])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
from pack_loader import load_pack  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402


def weights(patcher) -> dict:
    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
    return {k: v.detach().float().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def main():
    lora = load_pack(PACK_ROOT, "nodes.lora")
    cases = json.loads((WORK / "cases.json").read_text())
    folder_paths.add_model_folder_path("loras", str(WORK / "loras"), is_default=True)
    out = {"listed": sorted(folder_paths.get_filename_list("loras"))}
    for variant, case in cases.items():
        model = comfy.sd.load_diffusion_model(case["model"])
        reference = weights(comfy.sd.load_diffusion_model(case["merged"]))
        base = weights(model)
        patched, summary = lora.apply_tdm_lora(model, case["lora"], "recorded", 0.3)
        got = weights(patched)
        comfy.model_management.unload_all_models()
        changed = [k for k in got if (got[k] - base[k]).abs().max() > 0]
        out[variant] = {
            "type": type(model.model).__name__, "summary": summary,
            "max_abs_vs_merged": max(float((got[k] - reference[k]).abs().max()) for k in got),
            "max_abs_lora": max(float((reference[k] - base[k]).abs().max()) for k in got),
            "changed": len(changed), "unchanged_model_kept": max(float((weights(model)[k] - base[k]).abs().max())
                                                                  for k in base),
        }
        if "wrong_lora" in case:
            try:
                lora.apply_tdm_lora(model, case["wrong_lora"], "recorded", 1.0)
                out[variant]["wrong"] = "accepted"
            except ValueError as error:
                out[variant]["wrong"] = str(error)
    try:  # a MODEL that is not SD3: on-load conversion cannot name the list
        lora.apply_tdm_lora(SimpleNamespace(model=object()), next(iter(cases.values()))["lora"], "recorded", 1.0)
        out["not_sd3"] = "accepted"
    except ValueError as error:
        out["not_sd3"] = str(error)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
