"""Builds the shipped workflows from one description each: the UI-format (0.4) file that users
drop into ComfyUI and its API-format twin for POST /prompt (workflows/api/). Run after changing a
node's inputs:

    .venv/bin/python workflows/build.py

then renew the .jpg thumbnails, screenshots of each file in ComfyUI's own frontend (a test says
when one is stale): the frontend integration test with TDM_UPDATE_THUMBNAILS=1 (README, Tests).

The files are committed; tests check that they are current, well-formed, and (with ComfyUI)
that every widget matches the running server's node definitions.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

# Socket inputs, widgets (in ComfyUI's input order) and outputs of every node type we use.
# Widgets that have control_after_generate get an extra UI value right after their own.
CATALOG: dict[str, dict] = {
    "CheckpointLoaderSimple": {"inputs": [], "widgets": ["ckpt_name"],
                               "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]},
    "UNETLoader": {"inputs": [], "widgets": ["unet_name", "weight_dtype"], "outputs": [("MODEL", "MODEL")]},
    "CLIPLoader": {"inputs": [], "widgets": ["clip_name", "type", "device"], "outputs": [("CLIP", "CLIP")]},
    "VAELoader": {"inputs": [], "widgets": ["vae_name"], "outputs": [("VAE", "VAE")]},
    "TripleCLIPLoader": {"inputs": [], "widgets": ["clip_name1", "clip_name2", "clip_name3"],
                         "outputs": [("CLIP", "CLIP")]},
    "CLIPTextEncode": {"inputs": [("clip", "CLIP")], "widgets": ["text"], "outputs": [("CONDITIONING", "CONDITIONING")]},
    "ConditioningZeroOut": {"inputs": [("conditioning", "CONDITIONING")], "widgets": [],
                            "outputs": [("CONDITIONING", "CONDITIONING")]},
    "EmptyLatentImage": {"inputs": [], "widgets": ["width", "height", "batch_size"], "outputs": [("LATENT", "LATENT")]},
    "EmptySD3LatentImage": {"inputs": [], "widgets": ["width", "height", "batch_size"],
                            "outputs": [("LATENT", "LATENT")]},
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "widgets": [], "outputs": [("IMAGE", "IMAGE")]},
    "SaveImage": {"inputs": [("images", "IMAGE")], "widgets": ["filename_prefix"], "outputs": []},
    "SamplerCustom": {
        "inputs": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                   ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
        "widgets": ["add_noise", "noise_seed", "cfg"], "control": {"noise_seed"},
        "outputs": [("output", "LATENT"), ("denoised_output", "LATENT")],
    },
    "TDMLoraLoader": {"inputs": [("model", "MODEL")], "widgets": ["lora_name", "strength_source", "strength"],
                      "outputs": [("MODEL", "MODEL")]},
    "TDMScheduler": {"inputs": [("model", "MODEL")],
                     "widgets": ["preset", "steps", "total_steps", "shift", "custom_timesteps", "denoise"],
                     "outputs": [("SIGMAS", "SIGMAS")]},
    "TDMSampler": {"inputs": [], "widgets": ["eta"], "outputs": [("SAMPLER", "SAMPLER")]},
    "TDMKSampler": {
        "inputs": [("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT"),
                   ("negative", "CONDITIONING")],
        "widgets": ["seed", "preset", "steps", "total_steps", "shift", "custom_timesteps", "eta", "cfg", "denoise"],
        "control": {"seed"}, "optional": {"negative"},
        "outputs": [("LATENT", "LATENT")],
    },
    "TDMExportEngine": {
        "inputs": [("model", "MODEL")],
        "widgets": ["name", "dtype", "batch_max", "height_min", "height_opt", "height_max", "width_min", "width_opt",
                    "width_max", "context_max", "timesteps", "build_tensorrt_engine", "num_steps"],
        "outputs": [("export_folder", "STRING")],
    },
    "TDMEngineLoader": {"inputs": [], "widgets": ["engine_name", "onnx_provider", "allow_failed_validation"],
                        "outputs": [("MODEL", "MODEL")]},
    "TDMTrainLoRA": {
        "inputs": [("model", "MODEL"), ("clip", "CLIP")],
        "widgets": ["prompts", "prompts_file", "negative_prompt", "width", "height", "steps", "batch_size",
                    "generator_learning_rate", "fake_learning_rate", "lora_rank", "lora_alpha", "grid", "num_steps",
                    "custom_timesteps", "training_cfg", "loss", "tau_mode", "unify_steps", "seed",
                    "gradient_checkpointing", "training_dtype", "lora_name", "resume", "checkpoint_every"],
        "control": {"seed"},
        "outputs": [("model", "MODEL"), ("lora", "LORA_MODEL"), ("loss_curve", "IMAGE"), ("lora_path", "STRING")],
    },
    "PreviewImage": {"inputs": [("images", "IMAGE")], "widgets": [], "outputs": []},
    "SaveAnimatedWEBP": {"inputs": [("images", "IMAGE")],
                         "widgets": ["filename_prefix", "fps", "lossless", "quality", "method"], "outputs": []},
    "TDMCogVideoXLoader": {"inputs": [], "widgets": ["model", "dtype"], "outputs": [("pipeline", "TDM_COGVIDEOX")]},
    "TDMCogVideoXLoRA": {"inputs": [("pipeline", "TDM_COGVIDEOX")],
                         "widgets": ["lora_name", "strength_source", "strength", "fuse"],
                         "outputs": [("pipeline", "TDM_COGVIDEOX")]},
    "TDMCogVideoXTextEncode": {"inputs": [("pipeline", "TDM_COGVIDEOX")], "widgets": ["text"],
                               "outputs": [("embeds", "TDM_COGVIDEOX_EMBEDS")]},
    "TDMCogVideoXSampler": {
        "inputs": [("pipeline", "TDM_COGVIDEOX"), ("positive", "TDM_COGVIDEOX_EMBEDS"),
                   ("negative", "TDM_COGVIDEOX_EMBEDS")],
        "widgets": ["seed", "frames", "width", "height", "preset", "steps", "custom_timesteps", "eta", "cfg"],
        "control": {"seed"}, "optional": {"negative"},
        "outputs": [("LATENT", "LATENT")],
    },
    "TDMCogVideoXDecode": {"inputs": [("pipeline", "TDM_COGVIDEOX"), ("samples", "LATENT")],
                           "widgets": ["tiling", "slicing"], "outputs": [("IMAGE", "IMAGE")]},
    "Note": {"inputs": [], "widgets": ["text"], "outputs": [], "virtual": True},  # frontend-only
}

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    links: dict = field(default_factory=dict)  # input name -> (node id, output slot)
    pos: tuple[int, int] = (0, 0)
    title: str | None = None


@dataclass
class Workflow:
    name: str
    title: str
    nodes: list[Node]
    models: list[dict]


def _tdm_grid(preset="tdm_uniform", steps=4, total_steps=900, shift=6.0, custom="899, 674, 449, 224"):
    return {"preset": preset, "steps": steps, "total_steps": total_steps, "shift": shift, "custom_timesteps": custom}


def _train_widgets(lora_name: str, custom: str) -> dict:
    """TDM Train LoRA at 1024 px: 500 steps, rank 32 / alpha 64, the paper's 4-step uniform grid, auto guidance."""
    return {
        "prompts": "a photograph of an astronaut riding a horse\na watercolor painting of a fox in a snowy "
                   "forest\na portrait of an old fisherman, dramatic light\na futuristic city at night, "
                   "neon reflections on wet streets",
        "prompts_file": "(none)", "negative_prompt": "", "width": 1024, "height": 1024, "steps": 500,
        "batch_size": 1, "generator_learning_rate": 2e-5, "fake_learning_rate": 1e-4, "lora_rank": 32,
        "lora_alpha": 64.0, "grid": "tdm_uniform", "num_steps": 4, "custom_timesteps": custom,
        "training_cfg": 0.0, "loss": "mse", "tau_mode": "separate", "unify_steps": "", "seed": 0,
        "gradient_checkpointing": True, "training_dtype": "bf16", "lora_name": lora_name,
        "resume": False, "checkpoint_every": 100}


def _note(node_id: int, text: str, pos) -> Node:
    return Node(node_id, "Note", {"text": text}, pos=pos, title="Read me")


def workflows() -> list[Workflow]:
    sdxl = Workflow(
        "sdxl_tdm_lora_4step",
        "SDXL + TDM LoRA, 4 steps (SamplerCustom)",
        [
            Node(1, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, pos=(40, 80)),
            Node(2, "TDMLoraLoader", {"lora_name": "tdm_sdxl_lora.safetensors", "strength_source": "recorded",
                                      "strength": 1.0}, {"model": (1, 0)}, pos=(420, 80)),
            Node(3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (1, 1)}, pos=(420, 300)),
            Node(4, "ConditioningZeroOut", {}, {"conditioning": (3, 0)}, pos=(800, 520)),
            Node(5, "TDMScheduler", {**_tdm_grid(), "denoise": 1.0}, {"model": (2, 0)}, pos=(800, 80)),
            Node(6, "TDMSampler", {"eta": 0.0}, pos=(800, 300)),
            Node(7, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(800, 740)),
            Node(8, "SamplerCustom", {"add_noise": True, "noise_seed": 0, "cfg": 1.0},
                 {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "sampler": (6, 0), "sigmas": (5, 0),
                  "latent_image": (7, 0)}, pos=(1180, 80)),
            Node(9, "VAEDecode", {}, {"samples": (8, 0), "vae": (1, 2)}, pos=(1560, 80)),
            Node(10, "SaveImage", {"filename_prefix": "TDM/sdxl"}, {"images": (9, 0)}, pos=(1560, 300)),
            _note(11, "SDXL with a TDM LoRA distilled by this pack's trainer (python -m tdm_train on SDXL), "
                      "saved in models/loras as tdm_sdxl_lora.safetensors. 4 steps at 899/674/449/224, cfg 1: "
                      "the TDM Scheduler gives the trained timesteps, the TDM Sampler starts from pure noise.",
                  (40, 520)),
        ],
        [{"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
          "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}],
    )
    pixart = Workflow(
        "pixart_alpha_tdm_4step",
        "PixArt-alpha 1024 + TDM LoRA, 4 steps",
        [
            Node(1, "UNETLoader", {"unet_name": "PixArt-XL-2-1024-MS.pth", "weight_dtype": "default"}, pos=(40, 80)),
            Node(2, "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"},
                 pos=(40, 300)),
            Node(3, "VAELoader", {"vae_name": "sd-vae-ft-ema.safetensors"}, pos=(40, 520)),
            Node(4, "TDMLoraLoader", {"lora_name": "tdm_pixart_alpha_lora.safetensors", "strength_source": "recorded",
                                      "strength": 1.0}, {"model": (1, 0)}, pos=(420, 80)),
            Node(5, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, pos=(420, 300)),
            Node(6, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(420, 520)),
            Node(7, "TDMKSampler", {"seed": 0, **_tdm_grid(), "eta": 0.0, "cfg": 1.0, "denoise": 1.0},
                 {"model": (4, 0), "positive": (5, 0), "latent_image": (6, 0)}, pos=(800, 80)),
            Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (3, 0)}, pos=(1180, 80)),
            Node(9, "SaveImage", {"filename_prefix": "TDM/pixart"}, {"images": (8, 0)}, pos=(1180, 300)),
            _note(10, "PixArt-alpha 1024 with a TDM LoRA from this pack's trainer (tdm_pixart_alpha_lora.safetensors "
                      "in models/loras). The paper's PixArt student: 4 steps at 899/674/449/224, cfg 1.", (40, 740)),
        ],
        [
            {"name": "PixArt-XL-2-1024-MS.pth", "directory": "diffusion_models",
             "url": "https://huggingface.co/PixArt-alpha/PixArt-alpha/resolve/main/PixArt-XL-2-1024-MS.pth"},
            {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
             "url": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"},
            {"name": "sd-vae-ft-ema.safetensors", "directory": "vae",
             "url": "https://huggingface.co/stabilityai/sd-vae-ft-ema-original/resolve/main/vae-ft-ema-560000-ema-pruned.safetensors"},
        ],
    )
    sd3 = Workflow(
        "sd3_medium_tdm_lora_4step",
        "SD3-Medium + official TDM SD3 LoRA (strength 0.125, flow shift 6), 4 steps",
        [
            Node(1, "CheckpointLoaderSimple", {"ckpt_name": "sd3_medium_incl_clips_t5xxlfp8.safetensors"}, pos=(40, 80)),
            Node(2, "TDMLoraLoader", {"lora_name": "tdm_sd3_lora.safetensors", "strength_source": "recorded",
                                      "strength": 0.125}, {"model": (1, 0)}, pos=(420, 80)),
            Node(3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (1, 1)}, pos=(420, 300)),
            Node(4, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(420, 520)),
            Node(5, "TDMKSampler", {"seed": 0, **_tdm_grid("flow_shifted", shift=6.0), "eta": 0.0, "cfg": 1.0,
                                    "denoise": 1.0},
                 {"model": (2, 0), "positive": (3, 0), "latent_image": (4, 0)}, pos=(800, 80)),
            Node(6, "VAEDecode", {}, {"samples": (5, 0), "vae": (1, 2)}, pos=(1180, 80)),
            Node(7, "SaveImage", {"filename_prefix": "TDM/sd3"}, {"images": (6, 0)}, pos=(1180, 300)),
            _note(8, "Official TDM SD3 LoRA (Luo-Yihong/TDM_sd3_lora) saved as models/loras/tdm_sd3_lora.safetensors. "
                     "It must run at strength 0.125 (the loader applies it: 'recorded'); flow sigmas with shift 6 "
                     "(1 to 6 work), 4 steps, cfg 1.", (40, 520)),
        ],
        [
            {"name": "sd3_medium_incl_clips_t5xxlfp8.safetensors", "directory": "checkpoints",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-3-medium/resolve/main/sd3_medium_incl_clips_t5xxlfp8.safetensors"},
            {"name": "tdm_sd3_lora.safetensors", "directory": "loras",
             "url": "https://huggingface.co/Luo-Yihong/TDM_sd3_lora/resolve/main/pytorch_lora_weights.safetensors"},
        ],
    )
    sd15 = Workflow(
        "sd15_dreamshaper_tdm_lora_4step",
        "Dreamshaper 7 (SD1.5) + official TDM Dreamshaper LoRA, 4 steps",
        [
            Node(1, "CheckpointLoaderSimple", {"ckpt_name": "dreamshaper_7.safetensors"}, pos=(40, 80)),
            Node(2, "TDMLoraLoader", {"lora_name": "tdm_dreamshaper.safetensors", "strength_source": "recorded",
                                      "strength": 1.0}, {"model": (1, 0)}, pos=(420, 80)),
            Node(3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (1, 1)}, pos=(420, 300)),
            Node(4, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, pos=(420, 520)),
            Node(5, "TDMKSampler", {"seed": 0, **_tdm_grid("custom", custom="999, 749, 500, 250"), "eta": 0.0,
                                    "cfg": 1.0, "denoise": 1.0},
                 {"model": (2, 0), "positive": (3, 0), "latent_image": (4, 0)}, pos=(800, 80)),
            Node(6, "VAEDecode", {}, {"samples": (5, 0), "vae": (1, 2)}, pos=(1180, 80)),
            Node(7, "SaveImage", {"filename_prefix": "TDM/dreamshaper"}, {"images": (6, 0)}, pos=(1180, 300)),
            _note(8, "Official TDM Dreamshaper LoRA (Luo-Yihong/TDM_dreamshaper_LoRA, tdm_dreamshaper.pt) converted to "
                     "safetensors as models/loras/tdm_dreamshaper.safetensors. The release samples at 999/749/500/250, "
                     "cfg 1.", (40, 520)),
        ],
        [{"name": "dreamshaper_7.safetensors", "directory": "checkpoints",
          "url": "https://huggingface.co/Lykon/dreamshaper-7/resolve/main/dreamshaper_7.safetensors"}],
    )
    export = Workflow(
        "sdxl_tdm_export_tensorrt",
        "SDXL + TDM LoRA -> ONNX and TensorRT engine (models/tensorrt)",
        [
            Node(1, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, pos=(40, 80)),
            Node(2, "TDMLoraLoader", {"lora_name": "tdm_sdxl_lora.safetensors", "strength_source": "recorded",
                                      "strength": 1.0}, {"model": (1, 0)}, pos=(420, 80)),
            Node(3, "TDMExportEngine", {"name": "sdxl_tdm_student", "dtype": "fp16", "batch_max": 2,
                                        "height_min": 512, "height_opt": 1024, "height_max": 1024, "width_min": 512,
                                        "width_opt": 1024, "width_max": 1024, "context_max": 77,
                                        "timesteps": "899, 674, 449, 224", "build_tensorrt_engine": True,
                                        "num_steps": 0},
                 {"model": (2, 0)}, pos=(800, 80)),
            _note(4, "Exports the SDXL student as loaded (the TDM LoRA merged at its recorded strength) to "
                     "models/tensorrt/sdxl_tdm_student/: model.onnx, model.opt.onnx, engine.json (checked on ONNX "
                     "Runtime against PyTorch), and a refittable fp16 TensorRT engine for 512-1024 px, batch 1-2. "
                     "The engine needs an NVIDIA GPU with TensorRT (pip install .[trt]); switch "
                     "build_tensorrt_engine off for the ONNX alone. Load the result with the TDM Engine Loader "
                     "workflow.", (40, 320)),
        ],
        [{"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
          "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}],
    )
    engine = Workflow(
        "sdxl_tdm_engine_4step",
        "SDXL TDM student from a TensorRT engine, 4 steps",
        [
            Node(1, "TDMEngineLoader", {"engine_name": "sdxl_tdm_student/"
                                                       "sdxl_fp16_b1-1-2_h64-128-128_w64-128-128_trt10.13.3_sm89.engine",
                                        "onnx_provider": "auto", "allow_failed_validation": False}, pos=(40, 80)),
            Node(2, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, pos=(40, 300)),
            Node(3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 1)}, pos=(420, 300)),
            Node(4, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(420, 520)),
            Node(5, "TDMKSampler", {"seed": 0, **_tdm_grid(), "eta": 0.0, "cfg": 1.0, "denoise": 1.0},
                 {"model": (1, 0), "positive": (3, 0), "latent_image": (4, 0)}, pos=(800, 80)),
            Node(6, "VAEDecode", {}, {"samples": (5, 0), "vae": (2, 2)}, pos=(1180, 80)),
            Node(7, "SaveImage", {"filename_prefix": "TDM/sdxl_engine"}, {"images": (6, 0)}, pos=(1180, 300)),
            _note(8, "The engine made by the export workflow (pick its file in the loader: engines are named after "
                     "their profile, TensorRT version and GPU; model.opt.onnx runs on ONNX Runtime instead). The "
                     "checkpoint only supplies CLIP and VAE. 4 steps at 899/674/449/224, cfg 1.", (40, 520)),
        ],
        [{"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
          "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}],
    )
    training = Workflow(
        "sdxl_tdm_train_lora",
        "Distil the loaded SDXL checkpoint into a 4-step TDM LoRA, then sample it",
        [
            Node(1, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, pos=(40, 80)),
            Node(2, "TDMTrainLoRA", _train_widgets("tdm_sdxl_student", "899, 674, 449, 224"),
                 {"model": (1, 0), "clip": (1, 1)}, pos=(420, 80)),
            Node(3, "CLIPTextEncode", {"text": PROMPT}, {"clip": (1, 1)}, pos=(800, 300)),
            Node(4, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(800, 520)),
            Node(5, "TDMKSampler", {"seed": 0, **_tdm_grid(), "eta": 0.0, "cfg": 1.0, "denoise": 1.0},
                 {"model": (2, 0), "positive": (3, 0), "latent_image": (4, 0)}, pos=(1180, 80)),
            Node(6, "VAEDecode", {}, {"samples": (5, 0), "vae": (1, 2)}, pos=(1560, 80)),
            Node(7, "PreviewImage", {}, {"images": (6, 0)}, pos=(1560, 300)),
            Node(8, "PreviewImage", {}, {"images": (2, 2)}, pos=(800, 740)),
            _note(9, "TDM distillation of the checkpoint as loaded, from prompts alone (no images): the model is the "
                     "teacher, the student and a fake score are two LoRAs on it, distilled from the teacher at "
                     "training_cfg 0 = auto: the family's recommended guidance (SDXL 8, as the paper; the same "
                     "default as python -m tdm_train). The LoRA lands in "
                     "models/loras/tdm_sdxl_student.safetensors (checkpoints and a diffusers copy in "
                     "output/tdm_training/); the node's model output samples at once in 4 steps, cfg 1. Cancel "
                     "stops after saving a checkpoint; turn resume on to continue. SDXL at 1024 px needs a GPU "
                     "(gradient checkpointing on, bf16).", (40, 320)),
        ],
        [{"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
          "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}],
    )
    cogvideox = Workflow(
        "cogvideox_2b_tdm_4step",
        "CogVideoX-2B + official TDM LoRA, 4 steps, 49 frames",
        [
            Node(1, "TDMCogVideoXLoader", {"model": "CogVideoX-2b", "dtype": "bf16"}, pos=(40, 80)),
            Node(2, "TDMCogVideoXLoRA", {"lora_name": "tdm_cogvideox_2b_lora.safetensors", "strength_source": "recorded",
                                         "strength": 1.0, "fuse": True}, {"pipeline": (1, 0)}, pos=(420, 80)),
            Node(3, "TDMCogVideoXTextEncode", {"text": "A panda, dressed in a small red jacket and a tiny hat, sits on a "
                                                      "wooden stool in a serene bamboo forest, strumming a guitar."},
                 {"pipeline": (2, 0)}, pos=(420, 300)),
            Node(4, "TDMCogVideoXSampler", {"seed": 0, "frames": 49, "width": 720, "height": 480, "preset": "cogvideox",
                                            "steps": 4, "custom_timesteps": "999, 856, 665, 399", "eta": 0.0,
                                            "cfg": 1.0},
                 {"pipeline": (2, 0), "positive": (3, 0)}, pos=(800, 80)),
            Node(5, "TDMCogVideoXDecode", {"tiling": True, "slicing": True}, {"pipeline": (2, 0), "samples": (4, 0)},
                 pos=(1180, 80)),
            Node(6, "SaveAnimatedWEBP", {"filename_prefix": "TDM/cogvideox", "fps": 8.0, "lossless": False,
                                         "quality": 90, "method": "default"}, {"images": (5, 0)}, pos=(1560, 80)),
            _note(7, "CogVideoX-2B as a diffusers folder in models/CogVideo/CogVideoX-2b (THUDM/CogVideoX-2b) and the "
                     "official TDM LoRA (Luo-Yihong/TDM_CogVideoX-2B_LoRA, pytorch_lora_weights.safetensors) saved as "
                     "models/loras/tdm_cogvideox_2b_lora.safetensors. 4 steps on the trained grid 999/856/665/399 "
                     "(not the stock 999/749/499/249), cfg 1, 49 frames at 720x480.", (40, 320)),
        ],
        [{"name": "tdm_cogvideox_2b_lora.safetensors", "directory": "loras",
          "url": "https://huggingface.co/Luo-Yihong/TDM_CogVideoX-2B_LoRA/resolve/main/pytorch_lora_weights.safetensors"}],
    )
    sd35_models = [
        {"name": "sd3.5_medium.safetensors", "directory": "checkpoints",
         "url": "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors"},
        *({"name": name, "directory": "text_encoders",
           "url": f"https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/text_encoders/{name}"}
          for name in ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")),
    ]

    def sd35_loaders() -> list[Node]:
        return [Node(1, "CheckpointLoaderSimple", {"ckpt_name": "sd3.5_medium.safetensors"}, pos=(40, 80)),
                Node(2, "TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                             "clip_name3": "t5xxl_fp16.safetensors"}, pos=(40, 300))]

    sd35 = Workflow(
        "sd35_medium_tdm_lora_4step",
        "SD3.5-Medium + official TDM SD3.5 LoRA (the .ckpt as downloaded), 4 steps",
        [
            *sd35_loaders(),
            Node(3, "TDMLoraLoader", {"lora_name": "tdm_sd3-5_lora.ckpt", "strength_source": "recorded",
                                      "strength": 1.0}, {"model": (1, 0)}, pos=(420, 80)),
            Node(4, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, pos=(420, 300)),
            Node(5, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(420, 520)),
            Node(6, "TDMKSampler", {"seed": 0, **_tdm_grid("flow_shifted", shift=3.0), "eta": 0.0, "cfg": 1.0,
                                    "denoise": 1.0},
                 {"model": (3, 0), "positive": (4, 0), "latent_image": (5, 0)}, pos=(800, 80)),
            Node(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, pos=(1180, 80)),
            Node(8, "SaveImage", {"filename_prefix": "TDM/sd35"}, {"images": (7, 0)}, pos=(1180, 300)),
            _note(9, "Official TDM SD3.5-Medium LoRA (Luo-Yihong/TDM_sd3-5_lora) as downloaded, "
                     "models/loras/tdm_sd3-5_lora.ckpt: a positional parameter list that the TDM LoRA Loader "
                     "converts on load for this SD3.5 model. Flow sigmas with shift 3 (1, 0.9, 0.75, 0.5), 4 steps, "
                     "cfg 1. A LoRA from the SD3.5 training workflow samples the same way (or tdm_uniform with "
                     "total_steps 1000).", (40, 520)),
        ],
        [*sd35_models, {"name": "tdm_sd3-5_lora.ckpt", "directory": "loras",
                        "url": "https://huggingface.co/Luo-Yihong/TDM_sd3-5_lora/resolve/main/tdm_sd3-5_lora.ckpt"}],
    )
    sd35_training = Workflow(
        "sd35_medium_tdm_train_lora",
        "Distil SD3.5-Medium into a 4-step TDM LoRA (flow matching), then sample it",
        [
            *sd35_loaders(),
            Node(3, "TDMTrainLoRA", _train_widgets("tdm_sd35_medium_student", "999, 749, 499, 249"),
                 {"model": (1, 0), "clip": (2, 0)}, pos=(420, 80)),
            Node(4, "CLIPTextEncode", {"text": PROMPT}, {"clip": (2, 0)}, pos=(800, 300)),
            Node(5, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(800, 520)),
            Node(6, "TDMKSampler", {"seed": 0, **_tdm_grid(total_steps=1000, custom="999, 749, 499, 249"), "eta": 0.0,
                                    "cfg": 1.0, "denoise": 1.0},
                 {"model": (3, 0), "positive": (4, 0), "latent_image": (5, 0)}, pos=(1180, 80)),
            Node(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, pos=(1560, 80)),
            Node(8, "PreviewImage", {}, {"images": (7, 0)}, pos=(1560, 300)),
            Node(9, "PreviewImage", {}, {"images": (3, 2)}, pos=(800, 740)),
            _note(10, "TDM distillation of SD3.5-Medium as loaded (rectified flow): the grid starts at pure noise, "
                      "999/749/499/249 = sigmas 1, 0.9, 0.75, 0.5 at the model's shift 3 (tdm_uniform with "
                      "total_steps 1000 samples exactly these), training_cfg 0 = auto: SD3.5's own sampling "
                      "guidance 4.5 (SD3-Medium: 7; the paper gives none). The LoRA lands in "
                      "models/loras/tdm_sd35_medium_student.safetensors (checkpoints in output/tdm_training/); "
                      "the node's model output samples at once in 4 steps, cfg 1. Needs a GPU at 1024 px "
                      "(gradient checkpointing on, bf16).", (40, 520)),
        ],
        sd35_models,
    )
    return [sdxl, pixart, sd3, sd15, export, engine, training, cogvideox, sd35, sd35_training]


def _widget_values(node: Node) -> list:
    spec = CATALOG[node.type]
    values = []
    for name in spec["widgets"]:
        values.append(node.widgets[name])
        if name in spec.get("control", ()):
            values.append("fixed")
    if set(node.widgets) != set(spec["widgets"]):
        raise ValueError(f"{node.type} #{node.id}: widgets {sorted(node.widgets)} != {spec['widgets']}")
    return values


def ui_format(workflow: Workflow) -> dict:
    """The litegraph 0.4 file the ComfyUI frontend saves and loads."""
    links, out_links = [], {}
    link_id = 0
    for node in workflow.nodes:
        for input_name, (source, slot) in node.links.items():
            link_id += 1
            input_type = dict(CATALOG[node.type]["inputs"])[input_name]
            source_type = CATALOG[next(n.type for n in workflow.nodes if n.id == source)]["outputs"][slot][1]
            if source_type != input_type:
                raise ValueError(f"{workflow.name}: {source}:{slot} ({source_type}) -> {node.id}.{input_name} ({input_type})")
            links.append([link_id, source, slot, node.id, input_name, input_type])
            out_links.setdefault((source, slot), []).append(link_id)
    nodes = []
    for order, node in enumerate(workflow.nodes):
        spec = CATALOG[node.type]
        inputs = []
        for slot, (name, typ) in enumerate(spec["inputs"]):
            link = next((l[0] for l in links if l[3] == node.id and l[4] == name), None)
            entry = {"name": name, "type": typ, "link": link}
            if name in spec.get("optional", ()):
                entry["shape"] = 7  # the frontend's optional-input marker
            inputs.append(entry)
        outputs = [
            {"name": name, "type": typ, "links": out_links.get((node.id, slot), []), "slot_index": slot}
            for slot, (name, typ) in enumerate(spec["outputs"])
        ]
        entry = {
            "id": node.id, "type": node.type, "pos": list(node.pos), "size": [340, 120 + 26 * len(spec["widgets"])],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.type}, "widgets_values": _widget_values(node),
        }
        if node.title:
            entry["title"] = node.title
        if node.type.startswith("TDM"):
            entry["properties"]["cnr_id"] = "comfyui-tdm"
        models = [m for m in workflow.models if m["name"] in node.widgets.values()]
        if models:
            entry["properties"]["models"] = models
        nodes.append(entry)
    for link in links:  # links store the target slot index, not the input name
        target = next(n for n in workflow.nodes if n.id == link[3])
        link[4] = [name for name, _ in CATALOG[target.type]["inputs"]].index(link[4])
    return {
        "id": _stable_id(workflow.name),
        "revision": 0,
        "last_node_id": max(n.id for n in workflow.nodes),
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "tdm": {"title": workflow.title}},
        "models": workflow.models,
        "version": 0.4,
    }


def _stable_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tdm/workflows/{name}"))


def api_format(workflow: Workflow) -> dict:
    """The same graph as a POST /prompt body's "prompt" (frontend-only nodes dropped)."""
    prompt = {}
    for node in workflow.nodes:
        spec = CATALOG[node.type]
        if spec.get("virtual"):
            continue
        inputs = dict(node.widgets)
        inputs.update({name: [str(source), slot] for name, (source, slot) in node.links.items()})
        prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title or node.type}}
    return prompt


def build(out_dir: Path = WORKFLOWS) -> list[Path]:
    written = []
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    for workflow in workflows():
        ui_path = out_dir / f"{workflow.name}.json"
        api_path = out_dir / "api" / f"{workflow.name}.json"
        ui_path.write_text(json.dumps(ui_format(workflow), indent=2) + "\n")
        api_path.write_text(json.dumps(api_format(workflow), indent=2) + "\n")
        written += [ui_path, api_path]  # the .jpg thumbnails are screenshots of the real frontend (README)
    return written


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else WORKFLOWS):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
