"""Teacher folders (diffusers pipeline layout): detect the backbone, build its backend, and encode
the prompts once (cached on disk; the text encoders are freed afterwards)."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import torch

from .. import atomic
from ..errors import read_json_object
from ..backends import CogVideoXBackend, PixArtBackend, SD3Backend, SDXLBackend
from ..backends.base import Backend, Condition

PIPELINE_CLASSES = {
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "CogVideoXPipeline": "cogvideox",
    "StableDiffusion3Pipeline": "sd3",
}
BACKBONES = ("sdxl", "pixart", "cogvideox", "sd3")
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default


def pipeline_class_name(folder: Path, hint: str) -> str:
    """The ``_class_name`` in the folder's model_index.json; ``hint`` says what to pass instead."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: {hint}")
    return read_json_object(index, "the pipeline's index").get("_class_name", "")


def detect_backbone(folder: str | Path) -> str:
    """The backbone named by the folder's model_index.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--pretrained_teacher_model {folder}: no such folder")
    name = pipeline_class_name(folder, "point --pretrained_teacher_model at a diffusers pipeline folder "
                                       "(or pass --backbone)")
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{folder} is a {name or 'unknown'} pipeline; TDM training supports "
                         f"{', '.join(PIPELINE_CLASSES)} (or force one with --backbone {'/'.join(BACKBONES)})")
    return PIPELINE_CLASSES[name]


def _scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the noise schedule comes from the teacher's scheduler config")
    return json.loads(path.read_text())


def _require(folder: Path, *subfolders: str) -> None:
    missing = [s for s in subfolders if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: not a complete pipeline folder")


@torch.no_grad()
def encode_prompts(folder: str | Path, backbone: str, prompts: list[str], device="cpu",
                   batch_size: int = 8) -> tuple[Condition, Condition]:
    """(conditions [N, ...] for the prompts, the empty prompt's condition [1, ...])."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    texts = list(prompts) + [""]
    if backbone == "sdxl":
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        _require(folder, "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
        tokenizers = [AutoTokenizer.from_pretrained(folder / "tokenizer"), AutoTokenizer.from_pretrained(folder / "tokenizer_2")]
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval(),
                    CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").to(device).eval()]
        embeds, pooled = [], []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            states = []
            for tokenizer, encoder in zip(tokenizers, encoders):
                ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids.to(device)
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])  # SDXL uses the penultimate layer of both encoders
            embeds.append(torch.cat(states, dim=-1).float().cpu())
            pooled.append(out.text_embeds.float().cpu())
        conditions = {"prompt_embeds": torch.cat(embeds), "text_embeds": torch.cat(pooled)}
        del encoders
    elif backbone == "sd3":
        conditions = _encode_sd3(folder, texts, device, batch_size)
    else:
        from transformers import T5EncoderModel

        _require(folder, "tokenizer", "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        encoder = T5EncoderModel.from_pretrained(folder / "text_encoder").to(device).eval()
        if backbone == "pixart":
            max_length = 120
        else:
            config = json.loads((folder / "transformer" / "config.json").read_text())
            max_length = int(config.get("max_text_seq_length", 226))
        embeds, masks = [], []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            tokens = tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
            mask = tokens.attention_mask.to(device)
            # PixArt passes the mask to T5 and to the transformer; CogVideoX uses neither
            out = encoder(tokens.input_ids.to(device), attention_mask=mask if backbone == "pixart" else None)[0]
            embeds.append(out.float().cpu())
            masks.append(mask.cpu())
        conditions = {"prompt_embeds": torch.cat(embeds)}
        if backbone == "pixart":
            conditions["prompt_attention_mask"] = torch.cat(masks)
        del encoder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    negative = {k: v[-1:] for k, v in conditions.items()}
    return {k: v[:-1] for k, v in conditions.items()}, negative


def _encode_sd3(folder: Path, texts: list[str], device, batch_size: int) -> Condition:
    """As StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states side by side,
    zero-padded to T5's width, then T5's states along the sequence (77 + 256 tokens); pooled = both
    CLIPs' projected outputs side by side."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    _require(folder, "tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")
    clips = [(AutoTokenizer.from_pretrained(folder / tok), CLIPTextModelWithProjection.from_pretrained(folder / enc)
              .to(device).eval()) for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
    t5_tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer_3")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3").to(device).eval()
    embeds, pooled = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        states, pools = [], []
        for tokenizer, encoder in clips:
            ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pools.append(out.text_embeds)
        ids = t5_tokenizer(chunk, padding="max_length", max_length=SD3_T5_LENGTH, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5_states = t5(ids)[0]
        clip_states = torch.cat(states, dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        embeds.append(torch.cat([clip_states, t5_states], dim=-2).float().cpu())
        pooled.append(torch.cat(pools, dim=-1).float().cpu())
    del clips, t5
    return {"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)}


def cached_prompt_conditions(folder: str | Path, backbone: str, prompts: list[str], cache_dir: str | Path,
                             device="cpu") -> tuple[Condition, Condition]:
    """:func:`encode_prompts`, computed once per (teacher, prompts) and kept in cache_dir."""
    from safetensors.torch import load_file

    key = hashlib.sha256(json.dumps([str(Path(folder).resolve()), backbone, prompts]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"prompt_cache_{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        conditions = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
        negative = {k.removeprefix("neg."): v for k, v in tensors.items() if k.startswith("neg.")}
        return conditions, negative
    conditions, negative = encode_prompts(folder, backbone, prompts, device)
    atomic.save_safetensors({**{f"cond.{k}": v for k, v in conditions.items()},
                             **{f"neg.{k}": v for k, v in negative.items()}}, path)
    return conditions, negative


def build_backend(folder: str | Path, backbone: str, negative: Condition, resolution: int = 1024,
                  height: int = 480, width: int = 720, frames: int = 49) -> Backend:
    folder = Path(folder)
    scheduler = _scheduler_config(folder)
    if backbone == "sdxl":
        from diffusers import UNet2DConditionModel

        _require(folder, "unet")
        return SDXLBackend(UNet2DConditionModel.from_pretrained(folder / "unet"), scheduler, resolution)
    if backbone == "pixart":
        from diffusers import PixArtTransformer2DModel

        _require(folder, "transformer")
        return PixArtBackend(PixArtTransformer2DModel.from_pretrained(folder / "transformer"), scheduler, negative,
                             resolution)
    if backbone == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

        _require(folder, "transformer")
        return CogVideoXBackend(CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"), scheduler,
                                negative, height=height, width=width, frames=frames)
    if backbone == "sd3":
        from diffusers import SD3Transformer2DModel

        _require(folder, "transformer")
        return SD3Backend(SD3Transformer2DModel.from_pretrained(folder / "transformer"), scheduler, negative, resolution)
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")


def add_sdxl_time_ids(conditions: Condition, resolution: int) -> Condition:
    """SDXL micro-conditions (original size, crop top-left, target size) for square training."""
    n = conditions["prompt_embeds"].shape[0]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return {**conditions, "time_ids": time_ids.repeat(n, 1)}
