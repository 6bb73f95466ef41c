"""The official demo's training iteration (Luo-Yihong/TDM, train_tdm_demo.py), re-implemented for
the benchmarks: the same networks, the same forwards in the same order, the same losses, over
THREE full copies of the network (teacher frozen, student and fake score trained in full with
AdamW), so its memory and its cost can be measured against our one-base trainer.

What one iteration does, as the demo does it (see /work/shared/research/tdm_paper.md, 1.7):
  rollout        4 student forwards, no grad, every point kept (no CFG)
  fake branch    the student's prediction at the drawn t_k RECOMPUTED (1 student forward, no grad),
                 a teacher forward at (x_tau, tau) that is computed and never used (no grad),
                 the fake forward with grad; DSM loss with min-SNR-5 and the importance weight;
                 backward, AdamW step on every fake parameter (no clipping)
  generator      fresh k / tau / z; the student step at t_k with grad; teacher cond, teacher
                 uncond (two separate forwards) and fake, all no grad; CFG folded into the target,
                 the per-sample |x0 - f_cfg| normaliser in float64, element-wise Huber (c = 1e-3)
                 or MSE; backward, clip 1.0, AdamW step on every student parameter, LR step
= 11 network forwards, 2 of them with grad.

Deliberate differences from the demo, none of which changes what is computed by the networks:
schedule arithmetic in float32 (the demo casts alpha/sigma to fp16), the generator's mid point
from its own k (the demo's fix df1a081), the last rollout step not re-noised to t = -1 (the demo
does, and throws it away), and an explicit forward adapter per backbone (``call``) instead of the
PixArt-only ``chunk(2)``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

# call(model, x_t, t, cond) -> the model's eps prediction (learned-sigma half dropped)
EpsCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def sdxl_eps(model, x_t, t, cond):
    dtype = next(model.parameters()).dtype
    return model(x_t.to(dtype), t, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                 added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype),
                                    "time_ids": cond["time_ids"].to(dtype)}).sample.float()


def pixart_eps(model, x_t, t, cond):
    dtype = next(model.parameters()).dtype
    out = model(x_t.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                encoder_attention_mask=cond["prompt_attention_mask"], timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return out.chunk(2, dim=1)[0].float()


def _per_sample(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return table[t].reshape(-1, *([1] * (ndim - 1)))


class OfficialDemoLayout:
    """Three full networks and two AdamW optimizers over every parameter of student and fake,
    with the demo's hyper-parameters (lr 2e-5, generator lr / 5, betas (0, 0.95), wd 1e-2)."""

    def __init__(self, teacher: torch.nn.Module, call: EpsCall, alphas_cumprod: torch.Tensor, latent_shape,
                 conditions: dict, negative: dict, *, total_steps: int = 900, num_steps: int = 4,
                 guidance_scale: float = 4.5, huber: bool = True, separate: bool = True, lr: float = 2e-5,
                 autocast_dtype: torch.dtype | None = None, seed: int = 0):
        """``teacher``: the network to distil (it becomes the frozen teacher; student and fake are
        deep copies of it, as the demo loads the same checkpoint three times). ``negative``: the
        unconditional condition of one sample (broadcast to the batch). ``autocast_dtype``: run the
        forwards under autocast (the demo's accelerate mixed precision) with fp32 weights."""
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).train().requires_grad_(True)
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.call, self.latent_shape = call, tuple(latent_shape)
        self.conditions, self.negative = conditions, negative
        self.num_prompts = next(iter(conditions.values())).shape[0]
        self.alpha = alphas_cumprod.float().sqrt()
        self.sigma = (1 - alphas_cumprod.float()).sqrt()
        self.total_steps, self.num_steps = total_steps, num_steps
        self.guidance_scale, self.huber, self.separate = guidance_scale, huber, separate
        self.autocast_dtype = autocast_dtype
        betas = (0.0, 0.95)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=lr / 5, betas=betas, weight_decay=1e-2)
        self.optimizer_d = torch.optim.AdamW(self.fake.parameters(), lr=lr, betas=betas, weight_decay=1e-2)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        self.generator = torch.Generator().manual_seed(seed)
        self.timer: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()

    # -------------------------------------------------------------- pieces
    def _forward(self, model, x_t, t, cond):
        """(eps, x0) of one network (the demo's Predictor.predict with steps=1, no CFG)."""
        if self.autocast_dtype is not None:
            with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
                eps = self.call(model, x_t, t, cond)
        else:
            eps = self.call(model, x_t, t, cond)
        x0 = (x_t - _per_sample(self.sigma, t, x_t.ndim) * eps) / _per_sample(self.alpha, t, x_t.ndim)
        return eps, x0

    def _add_noise(self, x0, eps, t):
        return _per_sample(self.alpha, t, x0.ndim) * x0 + _per_sample(self.sigma, t, x0.ndim) * eps

    def _transition(self, x_s, s, tau):
        """(alpha_tau / alpha_s, beta) of q(x_tau | x_s)."""
        a_s, s_s = _per_sample(self.alpha, s, x_s.ndim), _per_sample(self.sigma, s, x_s.ndim)
        a_t, s_t = _per_sample(self.alpha, tau, x_s.ndim), _per_sample(self.sigma, tau, x_s.ndim)
        beta = (s_t ** 2 - (a_t / a_s * s_s) ** 2).clamp_min(0).sqrt()
        return a_t / a_s, beta, s_s, s_t

    def _draw(self, batch: int):
        """k ~ U{1..K}, t_k = k T/K - 1, the mid point t_k - T/K + 1, tau per sample."""
        gen = self.generator
        ind = torch.randint(1, self.num_steps + 1, (batch,), generator=gen)
        t_g = ind * self.total_steps // self.num_steps - 1
        mid = t_g - self.total_steps // self.num_steps + 1
        tau = torch.zeros_like(t_g)
        for i in range(batch):
            low = max(20, int(mid[i]))
            high = int(t_g[i]) - 10 if self.separate else self.total_steps - 10
            tau[i] = torch.randint(low, high, (1,), generator=gen)[0]
        return ind, t_g, mid, tau

    def _batch(self, batch: int):
        index = torch.randint(self.num_prompts, (batch,), generator=self.generator)
        cond = {k: v[index] for k, v in self.conditions.items()}
        uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in self.negative.items()}
        noise = torch.randn((batch, *self.latent_shape), generator=self.generator)
        return noise, cond, uncond

    # -------------------------------------------------------------- one iteration
    def train_step(self, batch: int) -> dict:
        noise, cond, uncond = self._batch(batch)
        delta = self.total_steps // self.num_steps
        with self.timer("rollout"), torch.no_grad():  # generate_new(steps=4), no CFG
            t = torch.full((batch,), self.total_steps - 1, dtype=torch.long)
            x, points = noise, []
            for step in range(self.num_steps):
                points.append(x)
                eps, x0 = self._forward(self.student, x, t, cond)
                t = t - delta
                if step < self.num_steps - 1:
                    x = self._add_noise(x0, eps, t)
            points.append(x0)
            points.reverse()  # [x0, x_224, x_449, x_674, x_899]

        with self.timer("fake"):
            with torch.no_grad():
                ind, t_g, mid, tau = self._draw(batch)
                x_t = torch.stack([points[int(ind[i])][i] for i in range(batch)])
                model_eps, model_x0 = self._forward(self.student, x_t, t_g, cond)  # recomputed
                x_mid = self._add_noise(model_x0, model_eps, mid)
                z = torch.randn(x_mid.shape, generator=self.generator)
                ratio, beta, s_s, s_t = self._transition(x_mid, mid, tau)
                x_tau = ratio * x_mid + beta * z
                mixed_noise = (ratio * s_s * model_eps + beta * z) / s_t
                self._forward(self.teacher, x_tau, tau, cond)  # computed, never used (as in the demo)
            _, fake_x0 = self._forward(self.fake, x_tau, tau, cond)
            is_weight = torch.exp(-0.5 * mixed_noise.pow(2).flatten(1).mean(1)) / torch.exp(
                -0.5 * z.pow(2).flatten(1).mean(1))
            snr = (self.alpha[tau] / self.sigma[tau]) ** 2
            loss_score = F.mse_loss(fake_x0.float(), model_x0.float(), reduction="none").flatten(1).mean(1)
            loss_score = (loss_score * snr.clamp_max(5.0) * is_weight).mean()
        with self.timer("fake_update"):
            loss_score.backward()
            self.optimizer_d.step()
            self.optimizer_d.zero_grad()

        with self.timer("generator"):
            ind, t_g, mid, tau = self._draw(batch)
            x_t = torch.stack([points[int(ind[i])][i] for i in range(batch)])
            model_eps, model_x0 = self._forward(self.student, x_t, t_g, cond)  # with grad
            x_mid = self._add_noise(model_x0, model_eps, mid)
            ratio, beta, _, _ = self._transition(x_mid, mid, tau)
            x_tau = ratio * x_mid + beta * torch.randn(x_mid.shape, generator=self.generator)
            w = self.guidance_scale
            with torch.no_grad():
                _, sd_x0 = self._forward(self.teacher, x_tau, tau, cond)
                _, sd_x0_uncond = self._forward(self.teacher, x_tau, tau, uncond)
                _, fake_x0 = self._forward(self.fake, x_tau, tau, cond)
                target = model_x0.detach() + (sd_x0 - fake_x0) + (w - 1) * (sd_x0 - sd_x0_uncond)
            sd_cfg = sd_x0 + (w - 1) * (sd_x0 - sd_x0_uncond)
            dims = list(range(1, model_x0.ndim))
            weighting = (model_x0.double() - sd_cfg.double()).abs().mean(dim=dims, keepdim=True).detach()
            if self.huber:
                c = 1e-3
                loss = torch.mean((torch.sqrt((model_x0.float() - target.float()) ** 2 + c ** 2) - c) / weighting)
            else:
                loss = (F.mse_loss(model_x0.float(), target.float(), reduction="none") / weighting).mean()
        with self.timer("generator_update"):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return {"fake_loss": float(loss_score.detach()), "generator_loss": float(loss.detach())}

    @property
    def networks(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        return self.teacher, self.student, self.fake
