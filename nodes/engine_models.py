"""ComfyUI models to and from exported networks.

Export: a ComfyUI SDXL or SD1.x/2.x MODEL (LoRA patches merged) wrapped so its inputs carry the
names every TDM export uses (sample, timestep, encoder_hidden_states, add_embeds = ComfyUI's y).
Load: an engine or ONNX file with its engine.json becomes a ComfyUI MODEL — the right model_base
for the recorded family (SD3 exports: ComfyUI's SD3 flow model at the recorded shift), its noise
schedule rebuilt from the recorded one, and the network in place of ``diffusion_model`` — usable
with the TDM sampler, its memory reported to ComfyUI.
"""

from __future__ import annotations

import contextlib

import torch

from export.families import ExportShapes, FamilySpec, assemble
from export.manifest import EngineManifest
from tdm_train.schedule import NoiseSchedule

SDXL_FOURIER_DIM = 256  # ComfyUI's Timestep(256) per micro-condition


# ----------------------------------------------------------------------------- export
def comfy_family(model_patcher) -> str:
    base = model_patcher.model
    name = type(base).__name__
    unet_config = base.model_config.unet_config
    if name == "SDXL":
        return "sdxl"
    if name == "BaseModel" and not base.adm_channels and unet_config.get("context_dim") in (768, 1024):
        return "sd15"
    raise ValueError(f"TDM Export Engine exports SDXL and SD1.x/2.x models; this MODEL is a {name} "
                     f"({type(base.model_config).__name__}). PixArt-alpha, CogVideoX and SD3 / SD3.5 students export with "
                     "`python -m export.trt onnx` from their diffusers folder.")


def _pytorch_attention(func, *args, **kwargs):
    """Attention through torch's SDPA whatever ComfyUI picked for this machine: its sub-quadratic
    and split kernels (its CPU default) size their chunks from free memory and fill scratch
    tensors in place, which tracing bakes into the graph as constants (NaN ones, seen)."""
    import comfy.ldm.modules.attention

    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


class ComfyUNetForExport(torch.nn.Module):
    """ComfyUI's UNetModel with the export input names (``add_embeds`` is its ``y``), attention
    through SDPA (exported as plain MatMul/Softmax, which TensorRT fuses)."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, sample, timestep, encoder_hidden_states, add_embeds=None):
        return self.diffusion_model(sample, timestep, context=encoder_hidden_states, y=add_embeds,
                                    transformer_options={"optimized_attention_override": _pytorch_attention})


def comfy_family_spec(model_patcher, shapes: ExportShapes, dtype: str) -> FamilySpec:
    family = comfy_family(model_patcher)
    base = model_patcher.model
    unet_config = base.model_config.unet_config
    channels, context_dim = unet_config.get("in_channels", 4), unet_config["context_dim"]
    dims = [("sample", ["batch", channels, "height", "width"]), ("timestep", ["batch"]),
            ("encoder_hidden_states", ["batch", "text_len", context_dim])]
    conditioning = {"context_dim": context_dim}
    if family == "sdxl":
        dims.append(("add_embeds", ["batch", base.adm_channels]))
        conditioning.update(add_embeds_dim=base.adm_channels, add_time_embed_dim=SDXL_FOURIER_DIM,
                            pooled_dim=base.adm_channels - 6 * SDXL_FOURIER_DIM)
    latent = {"channels": channels, "vae_scale_factor": 8}
    return assemble(family, ComfyUNetForExport(base.diffusion_model), dims, shapes, dtype, conditioning, latent)


def comfy_scheduler_config(model_patcher) -> dict:
    """The model's discrete schedule as a diffusers config (its exact betas), and its prediction type."""
    import comfy.model_sampling

    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"TDM Export Engine needs a discrete-time model; this one samples with "
                         f"{type(sampling).__name__}")
    from .comfy_trainer import schedule_of

    betas = schedule_of(sampling)[0].betas
    prediction = "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": len(betas), "trained_betas": betas.tolist(),
            "prediction_type": prediction}


@contextlib.contextmanager
def exportable(diffusion_model, export_dtype: torch.dtype):
    """ComfyUI's manual-cast layers (``.view(dtype=)``, weight functions) do not trace; plain
    layers with merged weights do. Afterwards the flags, the dtype and — when the export casts to
    another dtype — the exact weights come back (a round trip through fp16 would round them), so
    the MODEL is unchanged for the rest of the workflow."""
    casting = {m: m.comfy_cast_weights for m in diffusion_model.modules() if hasattr(m, "comfy_cast_weights")}
    dtype_attribute = getattr(diffusion_model, "dtype", None)
    original_dtype = next(diffusion_model.parameters()).dtype
    saved = None
    if export_dtype != original_dtype:
        saved = {name: tensor.detach().to("cpu", copy=True) for name, tensor in diffusion_model.state_dict().items()}
    try:
        for module in casting:
            module.comfy_cast_weights = False
        if dtype_attribute is not None:
            diffusion_model.dtype = export_dtype  # what model_base.get_dtype() reports while exporting
        yield
    finally:
        for module, flag in casting.items():
            module.comfy_cast_weights = flag
        if saved is not None:
            diffusion_model.to(original_dtype)
            with torch.no_grad():
                for name, tensor in diffusion_model.state_dict().items():
                    tensor.copy_(saved[name])
        if dtype_attribute is not None:
            diffusion_model.dtype = dtype_attribute


# ----------------------------------------------------------------------------- load
class EngineDiffusionModel(torch.nn.Module):
    """Stands in for ComfyUI's ``diffusion_model``: ComfyUI's call (x, timesteps, context, y /
    c_size, c_ar) in, the exported network's output out. Batches over the profile's maximum are
    run in chunks (ComfyUI batches cond and uncond together when CFG > 1)."""

    def __init__(self, runner, manifest: EngineManifest):
        super().__init__()
        self.runner = runner
        self.manifest = manifest
        self.dtype = torch.float16 if manifest.dtype == "fp16" else torch.float32
        sample = manifest.input("sample")
        self.max_batch = sample.profile["max"][0] if sample.profile else sample.shape[0]

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None, c_size=None,
                c_ar=None, **kwargs):
        if control is not None:
            raise ValueError("an exported TDM engine has no ControlNet inputs: use the PyTorch model for ControlNet")
        outputs = []
        for start in range(0, x.shape[0], self.max_batch):
            part = slice(start, start + self.max_batch)
            feeds = {"sample": x[part], "timestep": timesteps[part].float(), "encoder_hidden_states": context[part]}
            family = self.manifest.family
            if family == "sdxl":
                if y is None:
                    raise ValueError("this SDXL engine needs ComfyUI's y (pooled text + size conditioning)")
                feeds["add_embeds"] = y[part]
            elif family == "pixart":
                feeds.update(self._pixart_feeds(context[part], c_size, c_ar, part))
            elif family == "sd3":
                feeds["pooled_projections"] = y[part]  # ComfyUI's SD3 y is the pooled CLIP-L + CLIP-G output
                self._check_sd3_length(context.shape[1])
            outputs.append(self.runner(**feeds))
        return torch.cat(outputs).to(x.device, x.dtype)

    def _check_sd3_length(self, tokens: int) -> None:
        """SD3's joint attention has no mask, so the text length cannot be padded: it must lie in the
        export's profile (ComfyUI's SD3 encoders give 77 CLIP + 77 T5 tokens for a short prompt)."""
        profile = self.manifest.input("encoder_hidden_states").profile
        low, high = profile["min"][1], profile["max"][1]
        if not low <= tokens <= high:
            raise ValueError(f"ComfyUI's text encoders gave {tokens} tokens; this SD3 engine takes {low}-{high} (no "
                             f"padding: SD3 attends to every token). Export it again with --text-len "
                             f"{min(low, tokens)}:{tokens}:{max(high, tokens)}")

    def _pixart_feeds(self, context, c_size, c_ar, part) -> dict:
        """ComfyUI passes T5 states without a mask; the export takes a fixed length and a mask."""
        length = self.manifest.conditioning["text_len"]
        tokens = context.shape[1]
        if tokens > length:
            raise ValueError(f"the prompt has {tokens} T5 tokens; this PixArt engine takes at most {length}")
        padded = torch.nn.functional.pad(context, (0, 0, 0, length - tokens))
        mask = torch.zeros(context.shape[0], length, device=context.device)
        mask[:, :tokens] = 1
        feeds = {"encoder_hidden_states": padded, "encoder_attention_mask": mask}
        if self.manifest.conditioning.get("micro_conditions"):
            feeds["resolution"] = c_size[part] if c_size.shape[0] > 1 else c_size.expand(context.shape[0], -1)
            feeds["aspect_ratio"] = c_ar[part] if c_ar.shape[0] > 1 else c_ar.expand(context.shape[0], -1)
        return feeds


def comfy_model(runner, manifest: EngineManifest, load_device, offload_device):
    """A ComfyUI ModelPatcher whose diffusion model is the exported network."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    family = manifest.family
    if family == "cogvideox":
        raise ValueError("ComfyUI core has no CogVideoX model to host this engine; run it with "
                         "`python -m export.trt generate`")
    context_dim = manifest.conditioning.get("context_dim")
    config_class = {"sdxl": comfy.supported_models.SDXL, "pixart": comfy.supported_models.PixArtAlpha,
                    "sd15": comfy.supported_models.SD20 if context_dim == 1024 else comfy.supported_models.SD15,
                    "sd3": comfy.supported_models.SD3}[family]
    config = config_class(dict(config_class.unet_config, disable_unet_model_creation=True))
    model_type = {"epsilon": comfy.model_base.ModelType.EPS,
                  "v_prediction": comfy.model_base.ModelType.V_PREDICTION,
                  "flow_prediction": comfy.model_base.ModelType.FLOW}.get(manifest.prediction_type)
    if model_type is None or (model_type == comfy.model_base.ModelType.FLOW) != (family == "sd3"):
        raise ValueError(f"{family} engines with prediction type {manifest.prediction_type!r} are not supported in "
                         "ComfyUI")
    schedule = NoiseSchedule.from_diffusers_config(manifest.scheduler_config)
    if family == "sd3":  # the recorded flow shift, not the family's default (model_sampling reads it at creation)
        config.sampling_settings = {**config.sampling_settings, "shift": schedule.shift}
    base_class = {"sdxl": comfy.model_base.SDXL, "pixart": comfy.model_base.PixArt,
                  "sd15": comfy.model_base.BaseModel, "sd3": comfy.model_base.SD3}[family]
    base = base_class(config, model_type=model_type, device=load_device)
    if family != "sd3":
        _use_recorded_schedule(base.model_sampling, manifest)
    base.diffusion_model = EngineDiffusionModel(runner, manifest)
    base.memory_required = lambda *args, **kwargs: 0  # the engine's activations are in its reported size
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device,
                                            size=max(1, runner.memory_bytes))


def _use_recorded_schedule(model_sampling, manifest: EngineManifest) -> None:
    """The engine's own schedule (exact betas), not the family's default: a fine-tune may differ."""
    schedule = NoiseSchedule.from_diffusers_config(manifest.scheduler_config)
    if float(schedule.alphas_cumprod[-1]) <= 0:  # zero terminal SNR: ComfyUI's own rescaling keeps the last sigma finite
        return
    model_sampling._register_schedule(given_betas=schedule.betas)
