"""What is exported for each model family: a thin wrapper module with flat, named tensor inputs
and one output (the raw prediction: eps or v, latent channels only), its dynamic axes, and the
min / opt / max shapes a TensorRT profile is built for.

The x0 conversion and the schedule arithmetic stay OUTSIDE the network, in float32 (TDM_SPEC: an
fp16 error at t = 899 is amplified about 60x by x0 = (x_t - sigma eps) / alpha).

Input names are shared by the CLI (diffusers models) and the ComfyUI export node (ComfyUI's own
models), so one engine loader serves both:

| family    | inputs                                                                      | output       |
|-----------|-----------------------------------------------------------------------------|--------------|
| sdxl      | sample [B,4,h,w], timestep [B], encoder_hidden_states [B,S,2048], add_embeds [B,2816] | model_output |
| sd15      | sample [B,4,h,w], timestep [B], encoder_hidden_states [B,S,768]             | model_output |
| pixart    | sample [B,4,h,w], timestep [B], encoder_hidden_states [B,120,4096], encoder_attention_mask [B,120] (+ resolution [B,2], aspect_ratio [B,1] for 1024 models) | model_output |
| cogvideox | sample [B,F,C,h,w] (F, h, w static), timestep [B], encoder_hidden_states [B,226,4096] | model_output |
| sd3       | sample [B,16,h,w], timestep [B] (= sigma * 1000), encoder_hidden_states [B,333,4096], pooled_projections [B,2048] | model_output (velocity) |

``add_embeds`` is SDXL's added conditioning already embedded: pooled text embeds followed by the
six cos-first Fourier features of the micro-conditions — exactly ComfyUI's 2816-wide ``y``, so an
SDXL engine runs under ComfyUI's model wrapper as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .manifest import TensorSpec

Range = tuple[int, int, int]  # min, opt, max
TORCH_TO_NAME = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ExportShapes:
    """Profile ranges, in latent units (pixels / 8). ``text_len`` is a range for SDXL / SD1.5
    (ComfyUI concatenates 77-token chunks for long prompts); PixArt and CogVideoX use one length.
    ``frames`` (latent frames) is static, CogVideoX only."""

    batch: Range = (1, 1, 4)
    height: Range = (64, 128, 128)
    width: Range = (64, 128, 128)
    text_len: Range = (77, 77, 77)
    frames: int | None = None

    def points(self) -> list[dict[str, int]]:
        """The shapes validation runs at: opt, then min and max where they differ (a baked-in shape
        shows up at the second point, as CogVideoX's position table would)."""
        points = []
        for which in (1, 0, 2):
            point = {"batch": self.batch[which], "height": self.height[which], "width": self.width[which],
                     "text_len": self.text_len[which]}
            if point not in points:
                points.append(point)
        return points

    def bounded_points(self) -> list[dict[str, int]]:
        """The CPU validation plan, whose cost is at most about twice one call at the opt shape: opt;
        the smallest size at the largest batch (batch and text length change, at the cheapest size);
        the largest size at batch 1. Every dynamic axis still moves away from opt at least once, so
        a baked-in shape still shows up, without running the profile's most expensive corner
        (largest batch at largest size: 4 x 1024 px for the default SDXL profile)."""
        points = []
        for batch, size, text in ((1, 1, 1), (2, 0, 2), (0, 2, 0)):
            point = {"batch": self.batch[batch], "height": self.height[size], "width": self.width[size],
                     "text_len": self.text_len[text]}
            if point not in points:
                points.append(point)
        return points


# ----------------------------------------------------------------------------- wrappers
class _PrecomputedTimeEmbeds(torch.nn.Module):
    """Stands in for the UNet's ``add_time_proj`` when the Fourier features come precomputed in
    ``add_embeds`` (diffusers flattens time_ids, projects, and reshapes to [B, -1])."""

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        return flat


class SDXLUNetForExport(torch.nn.Module):
    """A diffusers SDXL UNet taking ComfyUI's ``y`` (pooled ‖ Fourier(time_ids)) as ``add_embeds``.
    Takes ownership of ``unet`` (its add_time_proj is replaced)."""

    def __init__(self, unet):
        super().__init__()
        self.pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        unet.add_time_proj = _PrecomputedTimeEmbeds()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, add_embeds):
        added = {"text_embeds": add_embeds[:, : self.pooled_dim], "time_ids": add_embeds[:, self.pooled_dim:]}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class UNetForExport(torch.nn.Module):
    """A diffusers SD1.x / SD2.x UNet (no added conditioning)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class PixArtForExport(torch.nn.Module):
    """PixArt-alpha's transformer returning the eps half of its learned-sigma output."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        config = transformer.config
        self.channels = config.in_channels
        self.micro_conditions = config.sample_size == 128

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, resolution=None,
                aspect_ratio=None):
        dtype = sample.dtype
        added = {"resolution": None, "aspect_ratio": None}
        if self.micro_conditions:
            added = {"resolution": resolution.to(dtype), "aspect_ratio": aspect_ratio.to(dtype)}
        out = self.transformer(sample, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask.to(dtype), timestep=timestep,
                               added_cond_kwargs=added, return_dict=False)[0]
        return out[:, : self.channels]


class CogVideoXForExport(torch.nn.Module):
    """CogVideoX-2B's transformer (v-prediction, [B, F, C, H, W], no rotary embeddings)."""

    def __init__(self, transformer, frames: int, height: int, width: int):
        super().__init__()
        if transformer.config.use_rotary_positional_embeddings:
            raise ValueError("this CogVideoX transformer uses rotary position embeddings (5B / 1.5): the export "
                             "supports CogVideoX-2B, which has none")
        self.transformer = transformer
        self._fix_position_table(frames, height, width)

    def _fix_position_table(self, frames: int, height: int, width: int) -> None:
        """diffusers rebuilds the sincos table in Python (through ``.data``, which tracing loses) when
        the latent size differs from the config's; store the table of the export size instead, so
        the traced graph holds the right constant."""
        embed = self.transformer.patch_embed
        pre_compression_frames = (frames - 1) * embed.temporal_compression_ratio + 1
        if (embed.sample_height, embed.sample_width, embed.sample_frames) != (height, width, pre_compression_frames):
            table = embed._get_positional_embeddings(height, width, pre_compression_frames)
            embed.sample_height, embed.sample_width, embed.sample_frames = height, width, pre_compression_frames
            embed.register_buffer("pos_embedding", table, persistent=False)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                image_rotary_emb=None, return_dict=False)[0]


class SD3ForExport(torch.nn.Module):
    """SD3 / SD3.5's transformer (rectified-flow velocity). Its timestep input is the network's own,
    sigma * 1000 (what diffusers' pipeline and ComfyUI's CONST models feed), not the table index."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


def sdxl_add_embeds(text_embeds: torch.Tensor, time_ids: torch.Tensor, time_embed_dim: int = 256) -> torch.Tensor:
    """ComfyUI's SDXL ``y`` from diffusers' conditioning: pooled embeds, then cos-first sinusoidal
    features (max period 10000) of the six micro-conditions, in float32."""
    from diffusers.models.embeddings import get_timestep_embedding

    batch = text_embeds.shape[0]
    fourier = get_timestep_embedding(time_ids.float().flatten(), time_embed_dim, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)
    return torch.cat([text_embeds.float(), fourier.reshape(batch, -1)], dim=-1)


# ----------------------------------------------------------------------------- specs
@dataclass
class FamilySpec:
    family: str
    module: torch.nn.Module  # the wrapper, called with inputs in ``input_specs`` order
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]
    dynamic_axes: dict[str, dict[int, str]]
    conditioning: dict
    latent: dict

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    def example_inputs(self, point: dict[str, int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return example_inputs(self.input_specs, self.dynamic_axes, point, generator)


def example_inputs(input_specs: list[TensorSpec], dynamic_axes: dict[str, dict[int, str]], point: dict[str, int],
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random inputs at one profile point (``{"batch", "height", "width", "text_len"}``), each in its
    dtype: timesteps in [1, 999], a real padding mask, consistent PixArt micro-conditions."""
    generator = generator or torch.Generator().manual_seed(0)
    feeds = {}
    for spec in input_specs:
        shape = _shape_at(spec, {int(k): v for k, v in dynamic_axes.get(spec.name, {}).items()}, point)
        dtype = {"float16": torch.float16, "float32": torch.float32}[spec.dtype]
        if spec.name == "timestep":
            value = torch.randint(1, 1000, shape, generator=generator).float()
        elif spec.name == "encoder_attention_mask":
            value = torch.ones(shape)
            value[:, shape[1] // 2:] = 0
        elif spec.name == "resolution":
            value = torch.tensor([[point["height"] * 8.0, point["width"] * 8.0]]).repeat(shape[0], 1)
        elif spec.name == "aspect_ratio":
            value = torch.full(shape, point["height"] / point["width"])
        else:
            value = torch.randn(shape, generator=generator)
        feeds[spec.name] = value.to(dtype)
    return feeds


def opt_point(manifest) -> dict[str, int]:
    """The profile's opt shape as a point for :func:`example_inputs`."""
    shapes = shapes_from_manifest(manifest)
    return {"batch": shapes.batch[1], "height": shapes.height[1], "width": shapes.width[1],
            "text_len": shapes.text_len[1]}


def _shape_at(spec: TensorSpec, axes: dict[int, str], point: dict[str, int]) -> list[int]:
    return [point[axes[i]] if i in axes else size for i, size in enumerate(spec.profile["opt"])]


def tensor_spec(name: str, dtype: str, dims: list, shapes: ExportShapes) -> tuple[TensorSpec, dict[int, str]]:
    """dims: ints for static sizes, axis names ("batch", "height", "width", "text_len") for dynamic ones."""
    ranges = {"batch": shapes.batch, "height": shapes.height, "width": shapes.width, "text_len": shapes.text_len}
    axes = {i: d for i, d in enumerate(dims) if isinstance(d, str) and ranges[d][0] != ranges[d][2]}
    profile = {which: [ranges[d][k] if isinstance(d, str) else d for d in dims]
               for k, which in enumerate(("min", "opt", "max"))}
    shape = [-1 if i in axes else profile["opt"][i] for i in range(len(dims))]
    return TensorSpec(name, dtype, shape, profile), axes


def family_spec(family: str, model: torch.nn.Module, shapes: ExportShapes, dtype: str) -> FamilySpec:
    """The export spec of a diffusers denoiser (UNet2DConditionModel / PixArtTransformer2DModel /
    CogVideoXTransformer3DModel / SD3Transformer2DModel) for ``family``; ``model`` is wrapped (and
    owned) by the spec."""
    config = model.config
    channels = config.in_channels
    image = ["batch", channels, "height", "width"]
    conditioning: dict = {}
    latent = {"channels": channels, "vae_scale_factor": 8}
    if family == "sdxl":
        if getattr(config, "addition_embed_type", None) != "text_time":
            raise ValueError("--family sdxl needs a UNet with SDXL's text_time added conditioning; this one has "
                             f"addition_embed_type={getattr(config, 'addition_embed_type', None)!r} (use --family sd15)")
        module = SDXLUNetForExport(model)
        add_dim = config.projection_class_embeddings_input_dim
        conditioning = {"add_time_embed_dim": config.addition_time_embed_dim, "pooled_dim": module.pooled_dim,
                        "add_embeds_dim": add_dim, "context_dim": config.cross_attention_dim}
        dims = [("sample", image), ("timestep", ["batch"]),
                ("encoder_hidden_states", ["batch", "text_len", config.cross_attention_dim]),
                ("add_embeds", ["batch", add_dim])]
    elif family == "sd15":
        if getattr(config, "addition_embed_type", None) is not None:
            raise ValueError("this UNet has added conditioning (SDXL-style); use --family sdxl")
        module = UNetForExport(model)
        conditioning = {"context_dim": config.cross_attention_dim}
        dims = [("sample", image), ("timestep", ["batch"]),
                ("encoder_hidden_states", ["batch", "text_len", config.cross_attention_dim])]
    elif family == "pixart":
        module = PixArtForExport(model)
        text_len = shapes.text_len[1]
        conditioning = {"text_len": text_len, "caption_channels": config.caption_channels,
                        "micro_conditions": module.micro_conditions}
        dims = [("sample", image), ("timestep", ["batch"]),
                ("encoder_hidden_states", ["batch", text_len, config.caption_channels]),
                ("encoder_attention_mask", ["batch", text_len])]
        if module.micro_conditions:
            dims += [("resolution", ["batch", 2]), ("aspect_ratio", ["batch", 1])]
    elif family == "cogvideox":
        if shapes.height[0] != shapes.height[2] or shapes.width[0] != shapes.width[2]:
            raise ValueError("CogVideoX exports need a static size (its sincos position table is fixed at export): "
                             "give --height and --width as one value each")
        frames = shapes.frames or (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        module = CogVideoXForExport(model, frames, shapes.height[1], shapes.width[1])
        text_len = config.max_text_seq_length
        latent.update(frames=frames, temporal_compression=config.temporal_compression_ratio)
        conditioning = {"text_len": text_len, "text_embed_dim": config.text_embed_dim}
        dims = [("sample", ["batch", frames, channels, shapes.height[1], shapes.width[1]]), ("timestep", ["batch"]),
                ("encoder_hidden_states", ["batch", text_len, config.text_embed_dim])]
    elif family == "sd3":
        module = SD3ForExport(model)
        text_len = shapes.text_len[1]
        conditioning = {"text_len": text_len, "joint_attention_dim": config.joint_attention_dim,
                        "pooled_dim": config.pooled_projection_dim, "network_timestep": "sigma*1000"}
        dims = [("sample", image), ("timestep", ["batch"]),
                ("encoder_hidden_states", ["batch", text_len, config.joint_attention_dim]),
                ("pooled_projections", ["batch", config.pooled_projection_dim])]
    else:
        raise ValueError(f"unknown family {family!r}")
    return assemble(family, module, dims, shapes, dtype, conditioning, latent)


def assemble(family: str, module: torch.nn.Module, dims: list[tuple[str, list]], shapes: ExportShapes, dtype: str,
             conditioning: dict, latent: dict) -> FamilySpec:
    """A FamilySpec from ``(input name, dims)`` pairs (see :func:`tensor_spec`); the output has the
    first input's (the latent's) dims. Timesteps are float32 whatever the dtype."""
    name = TORCH_TO_NAME[DTYPES[dtype]]
    inputs, dynamic_axes = [], {}
    for input_name, input_dims in dims:
        spec, axes = tensor_spec(input_name, "float32" if input_name == "timestep" else name, input_dims, shapes)
        inputs.append(spec)
        if axes:
            dynamic_axes[input_name] = axes
    output, out_axes = tensor_spec("model_output", name, dims[0][1], shapes)
    if out_axes:
        dynamic_axes["model_output"] = out_axes
    return FamilySpec(family, module.eval(), inputs, [output], dynamic_axes, conditioning, latent)


def shapes_from_manifest(manifest) -> ExportShapes:
    """The ExportShapes a manifest was exported with (to rebuild the same wrapper for reference)."""
    sample = manifest.input("sample").profile
    text = manifest.input("encoder_hidden_states").profile
    five_d = len(sample["opt"]) == 5
    h, w = (3, 4) if five_d else (2, 3)

    def axis(profile, i):
        return tuple(profile[k][i] for k in ("min", "opt", "max"))

    return ExportShapes(batch=axis(sample, 0), height=axis(sample, h), width=axis(sample, w), text_len=axis(text, 1),
                        frames=sample["opt"][1] if five_d else None)
