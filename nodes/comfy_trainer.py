"""The TDM trainer on a MODEL as ComfyUI loaded it: the ComfyUI backend of the x0-predictor
protocol, its two adapter sets as ComfyUI weight wrappers, and the LoRA files it writes.

- x0 comes from ComfyUI's own model wrapper (``apply_model``: eps, v and flow models alike) in
  k-diffusion space; the core works in VP space with integer timesteps, so the state is scaled
  by 1 / alpha_t going in (sigma = sigma_t / alpha_t), flow models take it as it is.
- "student" and "fake" are LoRA deltas on ONE patcher's weights (``add_weight_wrapper``, as
  ComfyUI's own LoRA trainer); the teacher is both switched off (weight_lora.WeightLoraRoles).
- Prompts are encoded by the CLIP as loaded and turned into the model's conditioning by the
  model itself (``extra_conds``: SDXL's y, PixArt's size conditions), once, before training.
- The LoRA is saved in ComfyUI's native keys (``diffusion_model.<path>.lora_up/lora_down/alpha``,
  true alpha), plus, for SDXL, the diffusers / kohya files of lora_export for diffusers users.
- A TDM-unify run (several K) whose trainer conditions the student on K (``step_conditions()``)
  writes c_K per trained K into every file (``tdm_step_embedding.k<K>`` + ``tdm.step_embedding``,
  ComfyUI path ``time_embed.2`` / ``t_embedder.mlp.2``), and the MODEL it returns carries the
  condition as the TDM LoRA Loader's does (nodes/step_condition.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

from tdm_train.backends.base import Backend, Condition
from tdm_train.presets import RECORDED_GRID_OPTION
from tdm_train.schedule import NoiseSchedule
from tdm_train.lora.weight_wrappers import WeightLoraRoles, lora_targets
from tdm_train.training.trainer import SingleProcess, TDMTrainer, TrainingStopped

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PIXART_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")
# ComfyUI's MMDiT: fused qkv and the output projection of both streams' attention (joint_blocks.N.x_block /
# context_block .attn), and SD3.5's second image attention (x_block.attn2): the diffusers SD3 LoRA's modules
MMDIT_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")


def training_family(model_patcher) -> str:
    base = model_patcher.model
    name = type(base).__name__
    if name == "SDXL":
        return "sdxl"
    if name == "PixArt":
        return "pixart"
    if name == "SD3":  # SD3.5 apart from SD3 (their guidance differs): the rule python -m tdm_train applies
        from tdm_train.recipes import guidance_family

        from .positional_lora import sd3_transformer_config

        return guidance_family("sd3", sd3_transformer_config(base.model_config.unet_config))
    if name == "BaseModel" and not base.adm_channels and base.model_config.unet_config.get("context_dim") in (768, 1024):
        return "sd15"
    raise ValueError(f"TDM Train LoRA distils SDXL, SD1.x/2.x, PixArt-alpha and SD3 / SD3.5 models; this MODEL is a {name} "
                     f"({type(base.model_config).__name__})")


def schedule_of(model_sampling) -> tuple[NoiseSchedule, bool]:
    """The model's own noise levels per integer timestep as a NoiseSchedule, and whether it is a
    flow (CONST) model. ComfyUI keeps k-diffusion sigmas: sigma = sigma_t / alpha_t for VP
    models, the flow time itself for CONST ones."""
    import comfy.model_sampling

    sigmas = model_sampling.sigmas.double().cpu()
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return NoiseSchedule(1 - sigmas, sigmas, prediction_type="flow_prediction", kind="flow"), True
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"TDM Train LoRA needs a discrete-time or flow model; this one samples with "
                         f"{type(model_sampling).__name__}")
    return NoiseSchedule.from_alphas_cumprod(1 / (1 + sigmas**2)), False


def encode_conditions(model_patcher, clip, prompts: list[str], latent: torch.Tensor) -> Condition:
    """Every prompt through the CLIP as loaded and the model's ``extra_conds``, stacked into one
    bank [N, ...] of apply_model keyword arguments (c_crossattn, y, c_size, ...). Cross-attention
    states of different lengths are repeated to a common one, as ComfyUI batches them."""
    import comfy.sampler_helpers
    import comfy.samplers

    per_prompt = []
    for text in prompts:
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        converted = comfy.sampler_helpers.convert_cond(conditioning)
        encoded = comfy.samplers.encode_model_conds(model_patcher.model.extra_conds, converted, latent, latent.device,
                                                    "positive")
        per_prompt.append(encoded[0]["model_conds"])
    keys = [k for k in per_prompt[0] if k not in ("c_concat",)]
    bank = {}
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs normal tensors
        for key in keys:
            first, rest = per_prompt[0][key], [c[key] for c in per_prompt[1:]]
            bank[key] = first.concat(rest).clone() if rest else first.cond.clone()
    return bank


class ComfyBackend(Backend):
    """A ComfyUI MODEL behind the x0-predictor protocol. Conditions are apply_model keyword
    arguments; the unconditional input is the negative prompt's."""

    default_lora_targets = UNET_TARGETS

    def __init__(self, model_patcher, family: str, negative: Condition, latent_shape: tuple[int, ...]):
        self.name = family
        self.patcher = model_patcher
        self.base = model_patcher.model
        self.model = self.base.diffusion_model
        self.negative = negative
        self._latent_shape = latent_shape  # [C, h, w]
        self.schedule, self.flow = schedule_of(model_patcher.get_model_object("model_sampling"))
        if family == "pixart":
            self.default_lora_targets = PIXART_TARGETS
            self.time_embedding_module = "t_embedder"
        elif family in ("sd3", "sd3.5"):
            self.default_lora_targets = MMDIT_TARGETS
            self.time_embedding_module = "t_embedder"
        else:
            self.time_embedding_module = "time_embed"

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self._latent_shape)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        alpha, sigma = self.schedule.coefficients(t, x_t)
        if self.flow:
            x_in, k_sigma = x_t, sigma
        else:
            x_in, k_sigma = x_t / alpha, sigma / alpha
        return self.base.apply_model(x_in, k_sigma.reshape(-1), **cond).float()

    def unconditional(self, cond: Condition) -> Condition:
        batch = next(iter(cond.values())).shape[0]
        out = {}
        for key, value in self.negative.items():
            value = value.to(cond[key].device)
            if key == "c_crossattn" and value.shape[1] != cond[key].shape[1]:
                value = _same_length(value, cond[key].shape[1])
            out[key] = value.expand(batch, *value.shape[1:])
        return out


def _same_length(states: torch.Tensor, length: int) -> torch.Tensor:
    """Cross-attention states repeated to ``length`` tokens (ComfyUI's own batching rule), so
    prompt and negative of different chunk counts share one batch."""
    if length % states.shape[1] == 0:
        return states.repeat(1, length // states.shape[1], 1)
    raise ValueError(f"negative prompt of {states.shape[1]} tokens cannot be batched with prompts of {length}: "
                     "shorten the longer one")


def bank_same_length(bank: Condition, negative: Condition) -> tuple[Condition, Condition]:
    """Prompt bank and negative with a common cross-attention length (their least common multiple)."""
    import math

    if "c_crossattn" not in bank:
        return bank, negative
    length = math.lcm(bank["c_crossattn"].shape[1], negative["c_crossattn"].shape[1])
    return ({**bank, "c_crossattn": _same_length(bank["c_crossattn"], length)},
            {**negative, "c_crossattn": _same_length(negative["c_crossattn"], length)})


def without_inference_tensors(module: torch.nn.Module) -> int:
    """Replaces weights that ComfyUI loaded under ``torch.inference_mode`` by normal copies of the
    same values: autograd cannot save inference tensors for backward (a LayerNorm's weight is
    needed for its input's gradient). Returns how many were replaced."""
    replaced = 0
    with torch.no_grad():
        for child in module.modules():
            for name, tensor in list(child._parameters.items()):
                if tensor is not None and tensor.is_inference():
                    child._parameters[name] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
                    replaced += 1
            for name, tensor in list(child._buffers.items()):
                if tensor is not None and tensor.is_inference():
                    child._buffers[name] = tensor.clone()
                    replaced += 1
    return replaced


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model, enabled: bool):
    """Gradient checkpointing of every block (the children of the model, ModuleLists opened),
    restored afterwards. The role in force at backward time is the one the step runs as
    (WeightLoraRoles.use restores it), so the recomputation sees the same weights."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    blocks = []
    for child in diffusion_model.children():
        members = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
        blocks += [m for m in members if any(p.numel() for p in m.parameters())]
    originals = {block: block.forward for block in blocks}
    for block, forward in originals.items():
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in originals.items():
            block.forward = forward


def native_lora(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WeightLoraRoles keys (``<path>.lora_down.weight`` / ``.lora_up.weight``) as ComfyUI's native
    LoRA: ``diffusion_model.<path>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` (true alpha)."""
    out = {}
    for key, value in state.items():
        out[f"diffusion_model.{key}"] = value.detach().float().cpu().contiguous()
        if key.endswith(".lora_down.weight"):
            out[f"diffusion_model.{key[: -len('.lora_down.weight')]}.alpha"] = torch.tensor(float(alpha))
    return out


def diffusers_names(unet_config: dict, modules: list[str]) -> dict[str, str]:
    """ComfyUI UNet module path -> diffusers module path (SDXL / SD1.x), from ComfyUI's own map."""
    import comfy.utils

    to_comfy = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> comfy key, for weights
    to_diffusers = {comfy_key.removesuffix(".weight"): key.removesuffix(".weight")
                    for key, comfy_key in to_comfy.items() if comfy_key.endswith(".weight")}
    missing = [m for m in modules if m not in to_diffusers]
    if missing:
        raise ValueError(f"no diffusers name for {len(missing)} trained modules, e.g. {missing[:3]}")
    return {m: to_diffusers[m] for m in modules}


class ComfyTDMTrainer(TDMTrainer):
    """TDMTrainer whose final LoRA goes where ComfyUI users look for it."""

    lora_path: Path
    family: str
    unet_config: dict | None = None

    def student_conditions(self):
        """The K-conditioned student's StepConditions (the library trainer's ``step_conditions()``,
        with ComfyUI's layer name as comfy_target), None for a fixed-K student or a trainer that
        does not condition the student on K."""
        method = getattr(super(), "step_conditions", None)
        conditions = method() if method is not None else None
        if conditions is not None and not conditions.comfy_target:
            raise ValueError(f"the student's step condition is on {conditions.target}, which has no ComfyUI name")
        return conditions

    def export_lora(self) -> tuple[Path, ...]:
        from tdm_train import atomic
        from tdm_train.lora.export import lora_metadata, save_student_lora

        cfg = self.config
        state = self.student_state()
        conditions = self.student_conditions()
        targets = cfg.lora_target_modules or self.backend.default_lora_targets
        extra = {"unify_steps": conditions.steps} if conditions is not None else None
        metadata = lora_metadata(self.family, cfg.lora_rank, cfg.lora_alpha, targets, self.objective.timesteps,
                                 self.step, extra_sampling=extra,
                                 title=f"TDM student ({self.family}, trained in ComfyUI)",
                                 training_cfg=cfg.tdm.guidance_scale)
        metadata["modelspec.implementation"] = "comfyui"
        native = native_lora(state, cfg.lora_alpha)
        if conditions is not None:
            native.update(conditions.tensors())
            metadata.update(conditions.metadata())
        atomic.save_safetensors(native, self.lora_path, metadata)
        written = [self.lora_path]
        if self.family in ("sdxl", "sd15") and self.unet_config is not None:
            modules = sorted({k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")})
            names = diffusers_names(self.unet_config, modules)
            peft = {}
            for module in modules:
                peft[f"{names[module]}.lora_A.weight"] = state[f"{module}.lora_down.weight"]
                peft[f"{names[module]}.lora_B.weight"] = state[f"{module}.lora_up.weight"]
            unify = {"step_conditions": conditions} if conditions is not None else {}
            written += list(save_student_lora(self.output_dir / "diffusers", self.family, peft, cfg.lora_rank,
                                              cfg.lora_alpha, targets, self.objective.timesteps, self.step,
                                              training_cfg=cfg.tdm.guidance_scale, **unify))
        return tuple(written)


def _forward_hooks(module: torch.nn.Module) -> dict[torch.nn.Module, set[int]]:
    return {m: set(m._forward_hooks) for m in module.modules()}


def _remove_new_forward_hooks(module: torch.nn.Module, before: dict[torch.nn.Module, set[int]]) -> None:
    """Takes out the forward hooks the trainer registered (the TDM-unify K embeddings of the fake
    score and the student sit on the timestep embedding): the diffusion model is shared by every
    clone of the MODEL, which must run afterwards exactly as loaded (the student MODEL gets its
    condition back as a per-call wrapper)."""
    for child in module.modules():
        for key in set(child._forward_hooks) - before.get(child, set()):
            del child._forward_hooks[key]
            child._forward_hooks_with_kwargs.pop(key, None)
            child._forward_hooks_always_called.pop(key, None)


def train_in_comfyui(model, clip, prompts, negative_prompt, width, height, config, dtype, gradient_checkpointing,
                     lora_path):
    """The training run: returns (MODEL with the student LoRA and, for a K-conditioned TDM-unify
    student, its step condition; the native LoRA state dict (weights only); history)."""
    import comfy.lora
    import comfy.model_management
    import comfy.utils
    import latent_preview

    from .patchers import classic_patcher, training_mode

    model = classic_patcher(model, "TDM Train LoRA")  # weight wrappers need held weights (ComfyUI 0.38)
    family = training_family(model)
    with torch.inference_mode(False), training_mode():
        patcher = model.clone()
        patcher.set_model_compute_dtype(dtype)
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        device = patcher.load_device
        channels = patcher.model.latent_format.latent_channels
        probe = torch.zeros(1, channels, height // 8, width // 8, device=device)
        bank, negative = bank_same_length(encode_conditions(patcher, clip, prompts, probe),
                                          encode_conditions(patcher, clip, [negative_prompt], probe))
        diffusion_model = patcher.model.diffusion_model
        diffusion_model.requires_grad_(False)
        backend = ComfyBackend(patcher, family, negative, (channels, height // 8, width // 8))
        targets = config.lora_target_modules or backend.default_lora_targets
        shapes = lora_targets(diffusion_model, targets)
        if not shapes:
            raise ValueError(f"TDM Train LoRA: no {targets} layers in this {family} model")
        roles = WeightLoraRoles(shapes, config.lora_rank, config.lora_alpha, device=device,
                                generator=torch.Generator().manual_seed(config.seed))
        for name, wrapper in roles.wrappers.items():
            patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", wrapper)
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)  # puts the wrappers in place
        without_inference_tensors(diffusion_model)

        hooks_before = _forward_hooks(diffusion_model)
        trainer = ComfyTDMTrainer(backend, bank, config, accelerator=SingleProcess(device), roles=roles)
        trainer.lora_path, trainer.family = lora_path, family
        trainer.unet_config = patcher.model.model_config.unet_config if family != "pixart" else None
        progress = comfy.utils.ProgressBar(config.max_train_steps)
        previewer = latent_preview.get_previewer(device, patcher.model.latent_format)

        def on_step(run):
            preview = None
            if previewer is not None and run.last_samples is not None:
                preview = previewer.decode_latent_to_preview_image("JPEG", run.last_samples[:1].detach())
            progress.update_absolute(run.step, config.max_train_steps, preview)
            comfy.model_management.throw_exception_if_processing_interrupted()

        diffusion_model.train()
        try:
            with checkpointed_blocks(diffusion_model, gradient_checkpointing):
                trainer.train(progress=True, on_step=on_step)
        except comfy.model_management.InterruptProcessingException:
            trainer.save_checkpoint()  # the Cancel button: a resumable state first, then stop
            logging.info("TDM Train LoRA: interrupted at step %d; checkpoint in %s (turn resume on to continue)",
                         trainer.step, config.output_dir)
            raise
        except TrainingStopped as error:
            raise ValueError(f"TDM Train LoRA: {error}") from error
        finally:
            diffusion_model.eval()
            patcher.weight_wrapper_patches.clear()
            _remove_new_forward_hooks(diffusion_model, hooks_before)  # the K embeddings (TDM-unify)
            comfy.model_management.unload_all_models()  # takes the training wrappers out of the weights
        state = native_lora(trainer.student_state(), config.lora_alpha)
        patches = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(model.model, {}))
        student = model.clone()
        student.add_patches(patches, 1.0)
        student.model_options[RECORDED_GRID_OPTION] = list(trainer.objective.timesteps)  # preset "recorded"
        conditions = trainer.student_conditions()
        if conditions is not None:
            from .step_condition import attach

            attach(student, conditions, lora_path.name)
    return student, state, trainer.history
