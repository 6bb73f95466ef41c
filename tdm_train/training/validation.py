"""Validation during training: the student at its K trained steps next to the teacher at its
usual step count with CFG, on the same noise and prompts, as a PNG grid (and in tensorboard)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .images import decode_to_images
from ..sampler import tdm_sample
from ..timesteps import tdm_timesteps


class Validator:
    def __init__(self, trainer, folder: Path, backbone: str, num_prompts: int = 2, teacher_steps: int = 25,
                 seed: int = 1234):
        self.trainer, self.backbone = trainer, backbone
        self.cond = {k: v[:num_prompts] for k, v in trainer.conditions.items()}
        self.uncond = trainer.backend.unconditional(self.cond)
        batch = next(iter(self.cond.values())).shape[0]
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(trainer.backend.latent_shape(batch), generator=gen).to(trainer.device)
        self.teacher_grid = tdm_timesteps(teacher_steps, trainer.backend.schedule.num_train_timesteps)
        self.vae = _load_vae(folder, backbone, trainer.device)
        self.out_dir = Path(trainer.output_dir) / "validation"

    @torch.no_grad()
    def run(self) -> Path:
        t = self.trainer
        schedule, scale = t.backend.schedule, t.config.tdm.guidance_scale
        student = tdm_sample(lambda x, ts: t.student(x, ts, self.cond), self.noise, t.objective.timesteps, schedule)

        def teacher_cfg(x, ts):
            if scale == 1.0:
                return t.teacher(x, ts, self.cond)
            cond_x0, uncond_x0 = t.teacher.paired(x, ts, self.cond, self.uncond)
            return cond_x0 + (scale - 1.0) * (cond_x0 - uncond_x0)

        teacher = tdm_sample(teacher_cfg, self.noise, self.teacher_grid, schedule)
        rows = [decode_to_images(student, self.vae, self.backbone), decode_to_images(teacher, self.vae, self.backbone)]
        grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, 2H, B*W]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{t.step:06d}.png"
        from PIL import Image

        Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(path)
        (self.out_dir / f"step-{t.step:06d}.json").write_text(json.dumps({
            "rows": [f"student, {len(t.objective.timesteps)} steps {t.objective.timesteps}",
                     f"teacher, {len(self.teacher_grid)} DDIM steps, CFG {scale}"]}))
        for tracker in t.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation/student_top_teacher_bottom", grid, t.step)
        return path


def _load_vae(folder: Path, backbone: str, device):
    vae_dir = Path(folder) / "vae"
    if not vae_dir.is_dir():
        return None
    if backbone == "cogvideox":
        from diffusers import AutoencoderKLCogVideoX as cls
    else:
        from diffusers import AutoencoderKL as cls
    return cls.from_pretrained(vae_dir).to(device).eval()
