"""A complete TDM few-step generation from an exported student: prompt embeddings in, latents
out (and an image through the base model's VAE when asked).

The network runs wherever its runner runs (PyTorch, ONNX Runtime, TensorRT); the trajectory is
tdm_train's own sampler, with the schedule arithmetic in float32 on the CPU side of the runner —
the same function the student was trained with."""

from __future__ import annotations

import torch

from tdm_train.sampler import tdm_sample
from tdm_train.schedule import NoiseSchedule

from .families import sdxl_add_embeds
from .runtime import Runner


class ExportedStudent:
    """An x0-predictor over a runner. Conditions use the trainer's names: ``prompt_embeds``;
    SDXL also ``text_embeds`` [B, 1280] and ``time_ids`` [B, 6] (or ComfyUI's ``y`` as
    ``add_embeds``); PixArt ``prompt_attention_mask``; SD3 ``pooled_prompt_embeds``."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.manifest = runner.manifest
        self.schedule = NoiseSchedule.from_diffusers_config(self.manifest.scheduler_config)

    def feeds(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        family, batch = self.manifest.family, x_t.shape[0]
        timestep = t.float().expand(batch)
        if family == "sd3":  # the flow transformer's own timestep: sigma * 1000, not the table index
            timestep = self.schedule.flow_timestep(t).float().expand(batch)
        feeds = {"sample": x_t, "timestep": timestep, "encoder_hidden_states": cond["prompt_embeds"]}
        if family == "sdxl":
            add_embeds = cond.get("add_embeds")
            if add_embeds is None:
                add_embeds = sdxl_add_embeds(cond["text_embeds"], cond["time_ids"],
                                             self.manifest.conditioning["add_time_embed_dim"])
            feeds["add_embeds"] = add_embeds
        elif family == "sd3":
            feeds["pooled_projections"] = cond["pooled_prompt_embeds"]
        elif family == "pixart":
            feeds["encoder_attention_mask"] = cond["prompt_attention_mask"]
            if self.manifest.conditioning.get("micro_conditions"):
                height, width = x_t.shape[-2] * 8.0, x_t.shape[-1] * 8.0
                feeds["resolution"] = torch.tensor([[height, width]]).repeat(batch, 1)
                feeds["aspect_ratio"] = torch.full((batch, 1), height / width)
        return feeds

    def fit_text_length(self, cond: dict) -> dict:
        """PixArt exports take one text length (120 by default): T5 states encoded at another
        length are cut or zero-padded to it, with the mask (padding is masked out either way)."""
        if self.manifest.family != "pixart":
            return cond
        length = self.manifest.conditioning["text_len"]
        states, mask = cond["prompt_embeds"], cond["prompt_attention_mask"]
        if states.shape[1] >= length:
            if mask[:, length:].any():
                raise ValueError(f"the prompt has {int(mask.sum(1).max())} T5 tokens; this PixArt export takes "
                                 f"{length}: re-export with --text-len {int(mask.sum(1).max())} or more")
            return {**cond, "prompt_embeds": states[:, :length], "prompt_attention_mask": mask[:, :length]}
        pad = length - states.shape[1]
        return {**cond, "prompt_embeds": torch.nn.functional.pad(states, (0, 0, 0, pad)),
                "prompt_attention_mask": torch.nn.functional.pad(mask, (0, pad))}

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        output = self.runner(**self.feeds(x_t, t, cond))
        return self.schedule.x0_from_output(output, x_t, t)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Latent shape at ``height`` x ``width`` latent pixels (default: the profile's opt)."""
        sample = self.manifest.input("sample").profile["opt"]
        if self.manifest.family == "cogvideox":
            return (batch, *sample[1:])
        return (batch, sample[1], height or sample[2], width or sample[3])

    def generate(self, cond: dict, noise: torch.Tensor, timesteps: list[int] | None = None, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The few-step trajectory from pure N(0, I) ``noise`` on the trained timesteps (an export
        of a TDM-unify student refuses a grid of another step count than its K)."""
        timesteps = timesteps or self.manifest.timesteps
        self.manifest.check_steps(len(timesteps))
        return tdm_sample(lambda x, t: self.x0(x, t, cond), noise, timesteps,
                          self.schedule, eta=eta, generator=generator)


@torch.no_grad()
def decode_latents(pipeline_folder, latents: torch.Tensor, family: str):
    """Images [B, H, W, 3] in [0, 1] (video frames [B, F, H, W, 3] for CogVideoX) from the base
    model's VAE."""
    from pathlib import Path

    folder = Path(pipeline_folder)
    if family == "cogvideox":
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(folder / "vae")
        video = vae.decode(latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).sample
        return ((video.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's VAE: latents were (z - shift) * scale
    image = vae.decode(latents / vae.config.scaling_factor + shift).sample
    return ((image.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)
