"""Runs inside ComfyUI's Python (ComfyUI root on PYTHONPATH): TDM Train LoRA with unify_steps on
the tiny SD1.5 checkpoint (3 steps, 64 px, fp32). Prints one JSON object: whether the trainer
conditions the student on K, what the saved files carry, and how the returned MODEL samples
compared with the saved file loaded by the TDM LoRA Loader.

    python check_unify_training_in_comfy.py PACK_ROOT MODELS_DIR WORK_DIR
"""

import json
import sys
from pathlib import Path

PACK_ROOT, MODELS, WORK = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402
from pack_loader import load_pack  # noqa: E402
from safetensors import safe_open  # noqa: E402

import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

TARGET = "time_embed.2"


def main():
    training = load_pack(PACK_ROOT, "nodes.training")
    lora_node = load_pack(PACK_ROOT, "nodes.lora")
    sampling = load_pack(PACK_ROOT, "nodes.sampling")
    from tdm_train.training.trainer import TDMTrainer

    out = {"trainer_conditions_the_student": hasattr(TDMTrainer, "step_conditions")}
    (WORK / "loras").mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(WORK / "loras"), is_default=True)
    folder_paths.set_output_directory(str(WORK / "output"))
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(MODELS / "checkpoints" / "tiny_sd15.safetensors"), output_vae=True, output_clip=True)
    diffusion_model = model.model.diffusion_model
    hooks_before = sum(len(m._forward_hooks) for m in diffusion_model.modules())

    result = training.TDMTrainLoRA.execute(
        model, clip, "a red cat\na blue dog", "(none)", "", 64, 64, 3, 1, 1e-3, 1e-3, 4, 8.0, "tdm_uniform", 4,
        "899, 674, 449, 224", 4.5, "mse", "separate", "1, 2", 0, False, "fp32", "tiny_unify", False, 100)
    student, lora_state, _curve, lora_path = result.args
    out["summary"] = result.ui.as_dict()["text"][0]
    out["hooks_left_on_the_shared_model"] = sum(len(m._forward_hooks) for m in diffusion_model.modules()) - hooks_before
    out["lora_model_output_has_condition_keys"] = any(k.startswith("tdm_step_embedding.") for k in lora_state)
    with safe_open(lora_path, "pt") as f:
        out["native_condition_keys"] = sorted(k for k in f.keys() if k.startswith("tdm_step_embedding."))
        out["native_step_embedding_metadata"] = json.loads((f.metadata() or {}).get("tdm.step_embedding", "null"))
    diffusers_file = WORK / "output" / "tdm_training" / "tiny_unify" / "diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(str(diffusers_file), "pt") as f:
        out["diffusers_condition_keys"] = sorted(k for k in f.keys() if k.startswith("tdm_step_embedding."))
    out["student_wrapper"] = sorted(student.wrappers.get("apply_model", {}))
    out["input_model_wrapper"] = sorted(model.wrappers.get("apply_model", {}))

    if out["native_condition_keys"]:
        from tdm_train.lora.step_embedding import StepConditions

        vectors = StepConditions.read(lora_path).vectors
        out["condition_norms"] = {k: float(v.norm()) for k, v in vectors.items()}
        loaded, summary = lora_node.apply_tdm_lora(model, Path(lora_path).name, "recorded", 1.0)
        out["loader_summary"] = summary
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red cat"))
        latent = {"samples": torch.zeros(1, 4, 8, 8)}

        def ksampler(patched, steps):
            return sampling.TDMKSampler.execute(patched, positive, latent, 7, "tdm_uniform", steps, 900, 6.0, "",
                                                0.0, 1.0, 1.0).args[0]["samples"].float()

        for k in (1, 2):
            out[f"student_vs_loaded_k{k}"] = float((ksampler(student, k) - ksampler(loaded, k)).abs().max())
        out["hooks_after_sampling"] = len(diffusion_model.get_submodule(TARGET)._forward_hooks)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
