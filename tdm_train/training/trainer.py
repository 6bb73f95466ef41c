"""The TDM training loop for diffusers backbones: explicit, accelerate-style.

One base network carries both LoRA adapters (roles.py); each iteration runs the TDM_SPEC
iteration from the core (distill.py): ``fake_updates_per_generator`` fake-score updates, each on
its own fresh rollout, then one generator update on the last rollout. With
``gradient_accumulation_steps`` N every update accumulates N micro-batches (each with its own
rollout and draws), so one step trains on N * train_batch_size samples per process.

Several processes train data-parallel: each draws its own batch, and the active adapter's
gradients are averaged across processes during backward by bucketed asynchronous all-reduces
(gradient_sync.py; one module with two adapters under DDP needs find_unused_parameters and still
trips over the alternating updates).

Precision: the frozen base runs in ``mixed_precision``'s dtype, the LoRA weights and optimizer
states stay fp32. fp16 adds dynamic loss scaling (one GradScaler per adapter): without it the
gradients that travel back through fp16 activations to the LoRA underflow at SDXL/CogVideoX
sizes. bf16 has fp32's exponent range and needs no scaler (and is the recommended choice).

EMA (``use_ema``, as the official demo's ``--use_ema``): diffusers' EMAModel over the student's
trainable weights (LoRA, and the K embedding in unify mode), updated after every applied generator
update with EMAModel's decay ramp min(decay, (1 + n) / (10 + n)). The exported LoRA holds the EMA
weights (the official releases ship their ``ema_parameters``); checkpoints hold both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .. import atomic
from ..errors import IncompatibleFile, NonFinite
from ..backends.base import Backend, Condition, RoleFunction
from ..distill import TDMConfig, TDMObjective
from .gradient_sync import BucketedGradientAverager
from .roles import AdapterRoles, lora_config

logger = logging.getLogger("tdm_train")


class TrainingStopped(NonFinite):
    """Training stopped on purpose (too many non-finite losses in a row)."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/tdm"
    max_train_steps: int = 500
    train_batch_size: int = 1  # per process and micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per update (per adapter)
    learning_rate: float = 2e-5  # the fake score's; the student's is learning_rate * generator_lr_ratio
    generator_lr_ratio: float = 0.2  # demo: lr / 5 (paper PixArt: 1/10)
    adam_beta1: float = 0.0
    adam_beta2: float = 0.95  # demo; the paper reports 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # generator only, as in the demo
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lora_rank: int = 32  # the authors' own TDM-R1 LoRA: r 32, alpha 64
    lora_alpha: float = 64.0
    lora_target_modules: tuple[str, ...] | None = None  # None: the backend's default
    mixed_precision: str = "no"  # "no", "fp16", "bf16": the frozen base's dtype; LoRA fp32; fp16 scales losses
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    seed: int = 0
    fake_updates_per_generator: int = 1  # TTUR
    # TDM-unify: the lr of the student's K embedding relative to the generator lr (None: the same)
    step_embedding_lr_ratio: float | None = None
    max_nonfinite_in_a_row: int = 5
    ddp_bucket_cap_mb: float = 25.0  # size of the gradient buckets all-reduced during backward (DDP's default)
    use_ema: bool = False  # export an EMA of the student's weights (the demo's --use_ema)
    ema_decay: float = 0.9999  # diffusers EMAModel's default, which the demo keeps
    tdm: TDMConfig = field(default_factory=TDMConfig)

    def __post_init__(self):
        problems = []
        if self.max_train_steps < 1:
            problems.append("--max_train_steps must be >= 1")
        if self.train_batch_size < 1:
            problems.append("--train_batch_size must be >= 1")
        if self.gradient_accumulation_steps < 1:
            problems.append("--gradient_accumulation_steps must be >= 1")
        if self.ddp_bucket_cap_mb <= 0:
            problems.append("--ddp_bucket_cap_mb must be > 0")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.fake_updates_per_generator < 1:
            problems.append("--fake_updates_per_generator must be >= 1")
        if self.step_embedding_lr_ratio is not None and not self.step_embedding_lr_ratio > 0:
            problems.append("--step_embedding_lr_ratio must be > 0")
        if self.lora_rank < 1:
            problems.append("--lora_rank must be >= 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append(f"checkpoints_total_limit must be >= 1 (or None: keep all), got {self.checkpoints_total_limit}")
        if self.checkpointing_steps < 1:
            problems.append("--checkpointing_steps must be >= 1")
        if self.max_nonfinite_in_a_row < 1:
            problems.append("--max_nonfinite_in_a_row must be >= 1")
        if not 0 < self.ema_decay < 1:
            problems.append(f"--ema_decay must lie in (0, 1), got {self.ema_decay}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.mixed_precision]

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["lora_target_modules"] = list(self.lora_target_modules or [])
        return data


class SingleProcess:
    """What TDMTrainer uses of an ``accelerate.Accelerator``, for one process on a device chosen
    by its host (ComfyUI manages its own devices; a second Accelerator there would fight it)."""

    process_index, num_processes, is_main_process, trackers = 0, 1, True, ()

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def wait_for_everyone(self) -> None:
        pass

    def log(self, values: dict, step: int | None = None) -> None:
        pass


def _finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).all())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mean_stats(stats: list[dict]) -> dict:
    """Per-micro-batch statistics averaged (the micro-batches are of equal size)."""
    return {key: _mean([s[key] for s in stats]) for key in stats[0]}


class TDMTrainer:
    """Distils ``backend``'s model into a K-step student LoRA on a bank of prompt conditions."""

    def __init__(self, backend: Backend, conditions: Condition, config: TrainConfig, accelerator=None, roles=None):
        """``roles``: the teacher/student/fake switch over ``backend.model``. None puts peft LoRA
        adapters into a diffusers model (roles.AdapterRoles); a caller that hosts the adapters
        otherwise (ComfyUI's weight wrappers: weight_lora.WeightLoraRoles) passes its own, with the
        model already on its device and in its dtype."""
        self.backend, self.config = backend, config
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.output_dir = Path(config.output_dir)
        self.conditions = {k: v.to(self.device) for k, v in conditions.items()}
        self.num_prompts = next(iter(conditions.values())).shape[0]

        model = backend.model
        self.roles = roles if roles is not None else self._peft_roles(model, config)
        self._sync_adapters()
        self.student, self.teacher, self.fake = (RoleFunction(backend, self.roles, r) for r in ("student", "teacher", "fake"))
        self.objective = TDMObjective(backend.schedule, config.tdm)
        # TDM-unify: K embeddings for the fake score (its role only) and for the student (its role
        # only), each zero-initialised, so a fresh run starts from the plain LoRA roles; the teacher has none
        self.step_embedding = self.student_step_embedding = None
        if config.tdm.unify_steps:
            from ..step_condition import attach

            where = getattr(backend, "time_embedding_module", backend.name)
            k_max = max(config.tdm.unify_steps)
            with torch.random.fork_rng(devices=[]):  # zero-initialised anyway: leave the run's global RNG alone
                torch.manual_seed(config.seed)
                self.step_embedding = attach(model, where, self.roles, k_max, role="fake")
                self.student_step_embedding = attach(model, where, self.roles, k_max, role="student")
            self.fake.step_embedding = self.step_embedding
            self.student.step_embedding = self.student_step_embedding

        betas = (config.adam_beta1, config.adam_beta2)
        generator_lr = config.learning_rate * config.generator_lr_ratio
        student_groups = [{"params": self.roles.parameters("student")}]
        if self.student_step_embedding is not None:
            ratio = config.step_embedding_lr_ratio or 1.0
            student_groups.append({"params": list(self.student_step_embedding.parameters()), "lr": generator_lr * ratio})
        self.optimizers = {
            "fake": torch.optim.AdamW(self.fake_parameters(), lr=config.learning_rate, betas=betas,
                                      weight_decay=config.adam_weight_decay, eps=config.adam_epsilon),
            "student": torch.optim.AdamW(student_groups, lr=generator_lr, betas=betas,
                                         weight_decay=config.adam_weight_decay, eps=config.adam_epsilon),
        }
        from diffusers.optimization import get_scheduler

        self.schedulers = {
            "student": get_scheduler(config.lr_scheduler, self.optimizers["student"],
                                     num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_train_steps),
            "fake": get_scheduler("constant", self.optimizers["fake"]),  # the fake score runs at a constant rate
        }
        # fp16: dynamic loss scaling per adapter (each has its own gradient range). Disabled scalers
        # (bf16, fp32) pass losses and steps straight through, so the loop below has one shape.
        self.scalers = {adapter: torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
                        for adapter in ("student", "fake")}
        self.gradient_averager = BucketedGradientAverager(self.world_size, config.ddp_bucket_cap_mb)
        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.student_parameters(), decay=config.ema_decay)
        # all randomness of the loop (batches, noise, k, tau, z) comes from this per-process generator
        self.generator = torch.Generator().manual_seed(config.seed + 1000 * self.rank)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.scaler_skipped_total = 0  # fp16 updates skipped for overflowing scaled gradients
        self.history: list[dict] = []
        self.last_samples: torch.Tensor | None = None

    def _peft_roles(self, model: torch.nn.Module, config: TrainConfig) -> AdapterRoles:
        model.to(self.device)
        if config.weight_dtype != torch.float32:
            model.to(config.weight_dtype)  # the frozen base; LoRA parameters are cast back to fp32 below
        targets = config.lora_target_modules or self.backend.default_lora_targets
        roles = AdapterRoles(model, lora_config(config.lora_rank, config.lora_alpha, targets), seed=config.seed)
        roles.cast_adapters(torch.float32)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        return roles

    def fake_parameters(self) -> list[torch.nn.Parameter]:
        """The fake score's trainable parameters: its LoRA, plus the K embedding in unify mode."""
        extra = list(self.step_embedding.parameters()) if self.step_embedding is not None else []
        return self.roles.parameters("fake") + extra

    def student_parameters(self) -> list[torch.nn.Parameter]:
        """The student's trainable parameters: its LoRA, plus its own K embedding in unify mode."""
        extra = list(self.student_step_embedding.parameters()) if self.student_step_embedding is not None else []
        return self.roles.parameters("student") + extra

    # -------------------------------------------------------------- one iteration
    def _batch(self) -> tuple[torch.Tensor, Condition, Condition]:
        index = torch.randint(self.num_prompts, (self.config.train_batch_size,), generator=self.generator)
        cond = Backend.select(self.conditions, index.to(self.device))
        noise = torch.randn(self.backend.latent_shape(self.config.train_batch_size), generator=self.generator)
        return noise.to(self.device), cond, self.backend.unconditional(cond)

    def _parameters(self, adapter: str) -> list[torch.nn.Parameter]:
        return self.fake_parameters() if adapter == "fake" else self.student_parameters()

    def _accumulate(self, loss: torch.Tensor, adapter: str, last: bool, healthy: bool) -> bool:
        """Backward of one micro-batch's loss into the adapter's gradients. Returns whether the
        update is still healthy: a non-finite loss on any process (all agree: ``_reduce``) poisons
        the whole update, and nothing more is backpropagated into it. The losses are batch means,
        so each micro-batch adds loss / N: N micro-batches of B give the gradient of one batch of
        N * B. Only the last micro-batch's backward averages over processes (DDP's no_sync)."""
        finite = _finite(self._reduce(loss))
        if not (healthy and finite):
            return False
        scaled = self.scalers[adapter].scale(loss / self.config.gradient_accumulation_steps)
        averaging = self.gradient_averager.averaging(self._parameters(adapter)) if last else contextlib.nullcontext()
        with averaging:
            scaled.backward()
        return True

    def _step(self, adapter: str, clip: float | None, healthy: bool) -> tuple[float | None, bool]:
        """Unscale, clip, step the adapter's optimizer. Returns (grad norm or None when nothing was
        applied, whether the fp16 scaler skipped the step for overflowing gradients). Without a
        scaler a non-finite gradient is skipped here and counts as a non-finite step."""
        optimizer, scaler = self.optimizers[adapter], self.scalers[adapter]
        if not healthy:
            optimizer.zero_grad(set_to_none=True)
            return None, False
        scaler.unscale_(optimizer)  # before clipping: the threshold is on true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters(adapter), clip if clip else float("inf"))
        if not scaler.is_enabled() and not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return None, False
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped when unscale_ found inf/NaN gradients
        scaler.update()  # ... and then the scale is lowered: that is how we know (as accelerate does)
        optimizer.zero_grad(set_to_none=True)
        overflow = scaler.is_enabled() and scaler.get_scale() < scale_before
        return (None if overflow else float(grad_norm)), overflow

    def train_step(self) -> dict:
        cfg = self.config
        log: dict = {}
        nonfinite = overflow = False
        for _ in range(cfg.fake_updates_per_generator):
            # the generator update below reuses the last round's micro-batches (their rollouts are the
            # current student's: the fake update does not change it)
            micro_batches, fake_losses, fake_stats = [], [], []
            healthy = True
            for i in range(cfg.gradient_accumulation_steps):
                noise, cond, uncond = self._batch()
                with self.roles.use("student"):
                    trajectory = self.objective.rollout(self.student, noise, cond, self.generator)
                micro_batches.append((cond, uncond, trajectory))
                with self.roles.use("fake"):
                    fake_loss, stats = self.objective.fake_score_loss(self.fake, trajectory, cond, self.generator)
                    healthy = self._accumulate(fake_loss, "fake", i == cfg.gradient_accumulation_steps - 1, healthy)
                fake_losses.append(float(fake_loss.detach()))
                fake_stats.append(stats)
            with self.roles.use("fake"):
                norm, skipped = self._step("fake", None, healthy)
            nonfinite |= not healthy or (norm is None and not skipped)
            overflow |= skipped
            self.last_samples = trajectory.sample  # the student's current x0 (previews)
            log.update(fake_loss=_mean(fake_losses), fake_grad_norm=norm, **_mean_stats(fake_stats))
        gen_losses, gen_stats = [], []
        with self.roles.use("student"):
            healthy = True
            for i, (cond, uncond, trajectory) in enumerate(micro_batches):
                gen_loss, stats = self.objective.generator_loss(
                    self.student, self.teacher, self.fake, trajectory, cond, uncond, self.generator)
                healthy = self._accumulate(gen_loss, "student", i == len(micro_batches) - 1, healthy)
                gen_losses.append(float(gen_loss.detach()))
                gen_stats.append(stats)
            norm, skipped = self._step("student", cfg.max_grad_norm, healthy)
            if self.ema is not None and norm is not None:  # only updates that were applied move the average
                # inside the student's role: EMAModel copies, not averages, parameters without requires_grad
                self.ema.step(self.student_parameters())
        nonfinite |= not healthy or (norm is None and not skipped)
        overflow |= skipped
        self.schedulers["student"].step()
        self.schedulers["fake"].step()
        log.update(generator_loss=_mean(gen_losses), generator_grad_norm=norm,
                   lr=self.schedulers["student"].get_last_lr()[0], **_mean_stats(gen_stats))
        self.step += 1
        if overflow:
            # dynamic loss scaling calibrating itself (or a transient spike): the scale was lowered and
            # the update skipped. Normal in fp16, so it never counts towards the non-finite stop.
            self.scaler_skipped_total += 1
            log["skipped_scaler_overflow"] = True
        for adapter, scaler in self.scalers.items():
            if scaler.is_enabled():
                log[f"loss_scale_{adapter}"] = scaler.get_scale()
        if nonfinite:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            log["skipped_nonfinite"] = True
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise TrainingStopped(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row (at step {self.step}); stopped. "
                    f"The last good checkpoint in {self.output_dir} is intact; lower --learning_rate, use bf16 "
                    "instead of fp16, or raise --max_nonfinite_in_a_row"
                )
        else:
            self.nonfinite_in_a_row = 0
        log["step"] = self.step
        self.history.append(log)
        return log

    def _reduce(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss every process agrees on for the finiteness check (a NaN on any rank skips all)."""
        if self.world_size == 1:
            return loss.detach()
        import torch.distributed as dist

        flag = loss.detach().clone().reshape(1)
        dist.all_reduce(flag)
        return flag

    def _sync_adapters(self) -> None:
        """Start every process from the main process's adapter initialisation."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for adapter in ("student", "fake"):
            for p in self.roles.parameters(adapter):
                dist.broadcast(p.data, src=0)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        final = self.output_dir / f"checkpoint-{self.step}"
        tmp = self.output_dir / f"checkpoint-{self.step}.tmp"
        if self.accelerator.is_main_process:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            state = {"step": self.step, "nonfinite_total": self.nonfinite_total,
                     "nonfinite_in_a_row": self.nonfinite_in_a_row, "scaler_skipped_total": self.scaler_skipped_total,
                     "world_size": self.world_size,
                     "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
                     "timesteps": self.objective.timesteps, "backend": self.backend.name,
                     "config": self.config.to_json(), "model_config": ckpt.model_config(self.backend.model)}
            adapters = {a: self.roles.state_dict(a) for a in ("student", "fake")}
            if self.step_embedding is not None:
                adapters["fake_step_embedding"] = {k: v.detach().clone() for k, v in self.step_embedding.state_dict().items()}
                adapters["student_step_embedding"] = {k: v.detach().clone()
                                                      for k, v in self.student_step_embedding.state_dict().items()}
            if self.ema is not None:  # positional, in student_parameters() order
                adapters["student_ema"] = {f"{i:05d}": p.detach().clone() for i, p in enumerate(self.ema.shadow_params)}
                state["ema"] = {"decay": self.ema.decay, "optimization_step": self.ema.optimization_step}
            try:
                ckpt.write_shared(tmp, adapters, self.optimizers, self.schedulers, state, self.scalers, self.history)
            except BaseException:  # disk full, interrupted: no half-written checkpoint folder stays behind
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, self.rank, self.generator)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ckpt.finalize(tmp, final)
            ckpt.rotate(self.output_dir, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return final

    def resume_identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it (checkpoint.differences)."""
        cfg = self.config
        return {"backbone": self.backend.name, "model_config": ckpt.model_config(self.backend.model),
                "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
                "lora_target_modules": list(cfg.lora_target_modules or []),  # as to_json records it
                "unify_steps": list(cfg.tdm.unify_steps) if cfg.tdm.unify_steps else None}

    def load_checkpoint(self, path: Path) -> None:
        data = ckpt.load(path, self.rank)
        state = data["state"]
        differs = ckpt.differences(state, self.resume_identity())
        if differs:
            raise IncompatibleFile(f"{path} is from another run: {'; '.join(differs)}. Resume it with the settings "
                                   "it was trained with, or start a fresh run (another --output_dir, or "
                                   "--overwrite_output_dir)")
        if state.get("world_size", 1) != self.world_size:
            raise IncompatibleFile(f"{path} was written by {state['world_size']} processes; resume with the same number "
                             f"(now {self.world_size})")
        accumulation = state.get("gradient_accumulation_steps", 1)
        if accumulation != self.config.gradient_accumulation_steps:
            raise IncompatibleFile(f"{path} was trained with --gradient_accumulation_steps {accumulation}; resume with the "
                             f"same (now {self.config.gradient_accumulation_steps}) to continue exactly")
        if state.get("timesteps") != self.objective.timesteps:
            raise IncompatibleFile(f"{path} trained on timesteps {state.get('timesteps')}, this run uses "
                             f"{self.objective.timesteps}; resume with the same grid")
        trained_cfg = state.get("config", {}).get("tdm", {}).get("guidance_scale")
        if trained_cfg is not None and trained_cfg != self.config.tdm.guidance_scale:  # e.g. a changed default
            logger.warning("%s was trained with teacher guidance %g; this run continues it with %g (set "
                           "--real_guidance_scale or the node's training_cfg to %g to keep the checkpoint's)",
                           path, trained_cfg, self.config.tdm.guidance_scale, trained_cfg)
        if self.step_embedding is not None:
            if "fake_step_embedding" not in data["adapters"]:
                raise ValueError(f"{path} has no step embedding: it was not a unify_steps run")
            if "student_step_embedding" not in data["adapters"]:
                raise ValueError(f"{path} was written before the TDM-unify student was conditioned on K (it holds "
                                 "the fake score's K embedding only): it cannot be resumed as a K-conditioned "
                                 "student; start a fresh run (a new --output_dir, or no --resume_from_checkpoint)")
        if (self.ema is not None) != ("student_ema" in data["adapters"]):
            raise IncompatibleFile(f"{path} was trained {'with' if 'student_ema' in data['adapters'] else 'without'} "
                                   "--use_ema; resume with the same setting to continue exactly")
        if self.ema is not None:
            shadow = data["adapters"]["student_ema"]
            self.ema.load_state_dict({**state["ema"], "shadow_params": [shadow[k].to(self.device) for k in sorted(shadow)]})
        for adapter in ("student", "fake"):
            self.roles.load_state_dict(adapter, {k: v.to(self.device) for k, v in data["adapters"][adapter].items()})
            self.optimizers[adapter].load_state_dict(data["optimizers"][adapter])
            self.schedulers[adapter].load_state_dict(data["schedulers"][adapter])
            scaler_state = data["scalers"].get(adapter)
            if self.scalers[adapter].is_enabled() and scaler_state:  # else a fresh scale calibrates itself
                self.scalers[adapter].load_state_dict(scaler_state)
        if self.step_embedding is not None:
            self.step_embedding.load_state_dict({k: v.to(self.device) for k, v in data["adapters"]["fake_step_embedding"].items()})
            self.student_step_embedding.load_state_dict(
                {k: v.to(self.device) for k, v in data["adapters"]["student_step_embedding"].items()})
        self.generator.set_state(data["rng"]["generator"])
        torch.set_rng_state(data["rng"]["torch"])
        self.step = state["step"]
        if data["history"] is not None:  # older checkpoints hold none: the log then restarts here
            self.history = [entry for entry in data["history"] if entry.get("step", 0) <= self.step]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.scaler_skipped_total = state.get("scaler_skipped_total", 0)

    # -------------------------------------------------------------- the loop
    def train(self, progress: bool = True, on_step=None) -> dict:
        """Run to max_train_steps (resuming if asked); ``on_step(trainer)`` runs after every step."""
        cfg = self.config
        resume = ckpt.resolve_resume(self.output_dir, cfg.resume_from_checkpoint, warn=logger.warning)
        if resume is not None:
            self.load_checkpoint(resume)
            logger.info("resumed from %s at step %d", resume, self.step)
        elif cfg.resume_from_checkpoint and self.accelerator.is_main_process:
            logger.warning("--resume_from_checkpoint %s: no checkpoint in %s yet, starting fresh",
                           cfg.resume_from_checkpoint, self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_train_steps, initial=self.step, desc="TDM", dynamic_ncols=True)
        while self.step < cfg.max_train_steps:
            log = self.train_step()
            if self.accelerator.trackers:
                self.accelerator.log({k: v for k, v in log.items() if isinstance(v, (int, float))}, step=self.step)
            if on_step is not None:
                on_step(self)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(gen=f"{log['generator_loss']:.4g}", fake=f"{log['fake_loss']:.4g}")
            due = self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_train_steps
            if due and not self.nonfinite_in_a_row:  # never checkpoint in the middle of a non-finite streak
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        summary = {"step": self.step, "nonfinite_total": self.nonfinite_total,
                   "scaler_skipped_total": self.scaler_skipped_total}
        if self.accelerator.is_main_process:
            atomic.write_text(self.output_dir / "train_history.json", json.dumps(self.history, indent=1))
            summary["lora_files"] = [str(p) for p in self.export_lora()]
        self.accelerator.wait_for_everyone()
        return summary

    @contextlib.contextmanager
    def exported_weights(self, ema: bool = True):
        """Within the block the student holds the weights it is exported with: its EMA with
        ``use_ema`` (unless ``ema`` is False), else its trained weights. They are restored afterwards."""
        if self.ema is None or not ema:
            yield
            return
        parameters = self.student_parameters()
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def export_lora(self, ema: bool = True) -> tuple[Path, Path]:
        """The final student LoRA: diffusers file, ComfyUI file, model card (lora_export.py); the
        EMA weights with ``use_ema``, the trained ones with ``ema=False`` (e.g. a snapshot of both)."""
        from ..lora.export import save_student_lora

        cfg = self.config
        targets = cfg.lora_target_modules or self.backend.default_lora_targets
        averaged = self.ema is not None and ema
        with self.exported_weights(averaged):
            return save_student_lora(self.output_dir, self.backend.name, self.student_state(), cfg.lora_rank,
                                     cfg.lora_alpha, targets, self.objective.timesteps, self.step,
                                     extra_sampling=self.backend.sampling_metadata(self.objective.timesteps) or None,
                                     training_cfg=cfg.tdm.guidance_scale, step_conditions=self.step_conditions(),
                                     family=self.backend.family, ema_decay=cfg.ema_decay if averaged else None)

    def step_conditions(self):
        """The TDM-unify student's K condition as it travels with its LoRA (lora/step_embedding.py):
        c_K = its K embedding at every trained K, for the Linear the embedding is added to. None
        for a fixed-K student."""
        if self.student_step_embedding is None:
            return None
        from ..lora.step_embedding import TARGETS, StepConditions

        vectors = self.student_step_embedding.vectors(self.config.tdm.unify_steps)
        target = self.student_step_embedding.target.replace(".base_layer", "")
        diffusers_target, comfy_target = TARGETS.get(self.backend.name, (None, None))
        if diffusers_target is not None and target in (diffusers_target, comfy_target):
            return StepConditions(diffusers_target, vectors, comfy_target)  # the family's names for it
        return StepConditions(target, vectors)

    def student_state(self) -> dict[str, torch.Tensor]:
        state = self.roles.state_dict("student")
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise TrainingStopped(f"the student LoRA has non-finite weights ({bad[:4]}); not saving it")
        return state

