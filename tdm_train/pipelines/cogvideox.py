"""CogVideoX-2B few-step video generation with TDM, from a diffusers folder: load, LoRAs applied
without touching the loaded weights, T5 prompt encoding, the TDM sampler on the trained grid
(999/856/665/399) of the folder's v-prediction zero-terminal-SNR schedule, VAE decode.

What the ComfyUI CogVideoX nodes run (nodes/cogvideox.py), and usable on its own. The sampler is
tdm_train's ``tdm_sample`` over the CogVideoX backend — the trainer's own x0 (exact at t = 999,
where alpha = 0)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..lora.merge import LoraMatch, describe_unmatched, match_lora, resolve_strength
from ..lora.step_embedding import StepConditions, applied
from ..timesteps import COGVIDEOX_TIMESTEPS

PIPELINE_CLASS = "CogVideoXPipeline"
INNER_DIM_OF = {1920: "CogVideoX-2B", 3072: "CogVideoX-5B"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_frames(frames: int) -> int:
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"CogVideoX takes 4k+1 frames (1, 5, ..., 49); {frames} is not (the VAE compresses time "
                         "4x after the first frame)")
    return frames


def model_name(transformer) -> str:
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    return INNER_DIM_OF.get(inner, f"CogVideoX with inner dim {inner}")


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA on the pipeline: its match against the transformer, strength and how it runs."""

    match: LoraMatch
    strength: float
    strength_source: str
    fuse: bool
    step_conditions: StepConditions | None = None  # a TDM-unify student's K condition (c_K per trained K)

    @property
    def name(self) -> str:
        return Path(self.match.path).name


@dataclass(frozen=True)
class CogVideoXParts:
    """A loaded CogVideoX folder. Immutable: ``with_lora`` returns a new value sharing the modules,
    so a cached loader output is never changed by what later nodes do."""

    folder: Path
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    dtype: torch.dtype
    loras: tuple[AppliedLora, ...] = field(default_factory=tuple)

    # -------------------------------------------------------------- loading
    @classmethod
    def load(cls, folder: str | Path, dtype: str = "bf16") -> CogVideoXParts:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(folder)
        index = folder / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        if name not in (PIPELINE_CLASS, "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"):
            raise ValueError(f"{folder} is not a CogVideoX diffusers folder (model_index.json names "
                             f"{name or 'nothing'}); expected {PIPELINE_CLASS} with transformer/, vae/, text_encoder/, "
                             "tokenizer/ and scheduler/")
        missing = [s for s in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: not a complete CogVideoX folder")
        torch_dtype = DTYPES[dtype]
        transformer = CogVideoXTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch_dtype)
        vae = AutoencoderKLCogVideoX.from_pretrained(folder / "vae", torch_dtype=torch_dtype)
        text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        for module in (transformer, vae, text_encoder):
            module.requires_grad_(False).eval()
        return cls(folder, transformer, vae, text_encoder, tokenizer, scheduler, torch_dtype)

    @property
    def rotary(self) -> bool:
        return bool(self.transformer.config.use_rotary_positional_embeddings)

    # -------------------------------------------------------------- LoRAs
    def with_lora(self, path: str | Path, strength: float | None = None, fuse: bool = True) -> CogVideoXParts:
        """This pipeline with one more LoRA (diffusers / peft format, ``.alpha`` tensors or adapter
        metadata honoured). Refuses a LoRA for another CogVideoX size, and one none of whose keys
        fit; lists keys that did not load in ``lora_report``."""
        try:
            match = match_lora(self.transformer, path)
        except ValueError as error:
            if "another model size" in str(error):
                raise ValueError(f"{Path(path).name} does not fit this {model_name(self.transformer)} transformer "
                                 f"(inner dim {self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim}); "
                                 f"is it a LoRA for another CogVideoX? {error}") from None
            raise
        if not match.modules:
            raise ValueError(f"{Path(path).name} is not a LoRA for this {model_name(self.transformer)}: "
                             + describe_unmatched(match.unmatched, len(match.unmatched)))
        value, source = resolve_strength(match.metadata, path, strength)
        conditions = StepConditions.read(path)
        if conditions is not None:  # a TDM-unify student: its K condition must fit this transformer
            k = conditions.steps[0]
            with applied(self.transformer, conditions, k):
                pass
        return replace(self, loras=(*self.loras, AppliedLora(match, value, source, fuse, conditions)))

    def lora_report(self) -> list[str]:
        lines = []
        for lora in self.loras:
            line = (f"{lora.name}: strength {lora.strength:g} ({lora.strength_source}), {len(lora.match.modules)} "
                    f"modules, {'fused' if lora.fuse else 'unfused'}")
            if lora.step_conditions is not None:
                line += f"; TDM-unify student, sampled with its K condition (K in {lora.step_conditions.steps})"
            if lora.match.unmatched:
                total = len(lora.match.unmatched) + len(lora.match.modules)
                line += "; WARNING: " + describe_unmatched(lora.match.unmatched, total)
            lines.append(line)
        return lines

    @contextlib.contextmanager
    def loras_applied(self, num_steps: int | None = None) -> Iterator[None]:
        """The LoRAs in force for one run of ``num_steps`` steps, then the weights exactly as
        loaded: fused ones add their delta to the weights (restored from copies of the touched
        weights afterwards), unfused ones add B(A x) to the layer's output through a forward hook.
        A TDM-unify LoRA's K condition for ``num_steps`` is added by a hook either way (a K it was
        not trained for is refused; ``num_steps`` None: only for LoRAs without a K condition)."""
        backups: dict[torch.nn.Parameter, torch.Tensor] = {}
        hooks = []
        unify = [lora for lora in self.loras if lora.step_conditions is not None]
        if unify and num_steps is None:
            raise ValueError(f"{unify[0].name} is a TDM-unify student: say how many steps it samples "
                             f"(one of {unify[0].step_conditions.steps})")
        for lora in unify:
            if num_steps not in lora.step_conditions.steps:
                raise ValueError(f"{lora.name} is a TDM-unify student trained for {lora.step_conditions.steps} "
                                 f"steps, not {num_steps}: sample it with one of {lora.step_conditions.steps} "
                                 "steps (each on its own uniform grid)")
        conditions = contextlib.ExitStack()
        try:
            for lora in unify:
                conditions.enter_context(applied(self.transformer, lora.step_conditions, num_steps))
            with torch.no_grad():
                for lora in self.loras:
                    for name, (module, layer) in lora.match.modules.items():
                        if lora.fuse:
                            weight = module.weight
                            backups.setdefault(weight, weight.detach().clone())
                            weight.add_(lora.match.delta(name, lora.strength).to(weight.device, weight.dtype))
                        else:
                            scale = lora.strength * (layer.alpha / layer.down.shape[0] if layer.alpha is not None else 1.0)
                            hooks.append(module.register_forward_hook(_low_rank_output(layer.down, layer.up, scale)))
            yield
        finally:
            with torch.no_grad():
                for weight, saved in backups.items():
                    weight.copy_(saved)
            for hook in hooks:
                hook.remove()
            conditions.close()

    # -------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode(self, prompts: list[str], device=None) -> torch.Tensor:
        """T5 states [B, 226, 4096] (the transformer's text length), as CogVideoXPipeline: no mask."""
        device = device or next(self.text_encoder.parameters()).device
        length = int(self.transformer.config.max_text_seq_length)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(device))[0].float()

    # -------------------------------------------------------------- sampling
    def sample(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None = None, seed: int = 0,
               frames: int = 49, height: int = 480, width: int = 720, timesteps=COGVIDEOX_TIMESTEPS,
               eta: float = 0.0, cfg: float = 1.0, callback: Callable[[int, torch.Tensor], None] | None = None,
               device=None) -> torch.Tensor:
        """Latents [B, F, C, h, w] from pure noise on the TDM grid. ``callback(step, x0)`` after
        each step (progress, previews, interrupt)."""
        from ..backends.cogvideox import CogVideoXBackend
        from ..sampler import tdm_sample

        check_frames(frames)
        if height % 16 or width % 16:
            raise ValueError(f"{width}x{height}: CogVideoX sizes are multiples of 16 (8x VAE, 2x2 patches)")
        if cfg > 1 and negative_embeds is None:
            raise ValueError("cfg > 1 needs a negative prompt")
        device = device or next(self.transformer.parameters()).device
        negative = {"prompt_embeds": (negative_embeds if negative_embeds is not None
                                      else torch.zeros_like(prompt_embeds[:1])).to(device)}
        backend = CogVideoXBackend(self.transformer, self.scheduler_config, negative, height=height, width=width,
                                   frames=frames, temporal_compression=self.vae.config.temporal_compression_ratio)
        batch = prompt_embeds.shape[0]
        cond = {"prompt_embeds": prompt_embeds.to(device)}
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(backend.latent_shape(batch), generator=generator).to(device)
        step = {"index": 0}

        def x0(x_t, t):
            with torch.no_grad():
                if cfg > 1:
                    uncond = backend.unconditional(cond)
                    both = backend.x0(torch.cat([x_t, x_t]), torch.cat([t, t]), backend.concat(cond, uncond))
                    conditional, unconditional = both.chunk(2)
                    out = unconditional + cfg * (conditional - unconditional)
                else:
                    out = backend.x0(x_t, t, cond)
            step["index"] += 1
            if callback is not None:
                callback(step["index"], out)
            return out

        with self.loras_applied(len(timesteps)):
            return tdm_sample(x0, noise, list(timesteps), backend.schedule, eta=eta, generator=generator)

    # -------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling: bool = False, slicing: bool = True) -> torch.Tensor:
        """Frames [B * F, H, W, 3] in [0, 1] (ComfyUI's IMAGE) from latents [B, F, C, h, w]."""
        vae = self.vae
        vae.enable_slicing() if slicing else vae.disable_slicing()
        vae.enable_tiling() if tiling else vae.disable_tiling()
        parameter = next(vae.parameters())
        z = latents.permute(0, 2, 1, 3, 4).to(parameter.device, parameter.dtype) / vae.config.scaling_factor
        video = vae.decode(z).sample  # [B, 3, F, H, W] in [-1, 1]
        frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return frames.reshape(-1, *frames.shape[2:]).cpu()


def _low_rank_output(down: torch.Tensor, up: torch.Tensor, scale: float):
    """Forward hook adding scale * up(down(x)) to a Linear's output (an unfused LoRA)."""
    def hook(module, inputs, output):
        x = inputs[0]
        low = torch.nn.functional.linear(x, down.to(x.device, x.dtype))
        return output + scale * torch.nn.functional.linear(low, up.to(x.device, x.dtype))
    return hook
