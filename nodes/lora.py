"""TDM LoRA Loader: applies a TDM LoRA at the strength it was made for."""

from __future__ import annotations

import contextlib
import logging
import pickle

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
from tdm_train.errors import unsafe_pickle
from tdm_train.lora.metadata import describe_unmatched, recommend
from tdm_train.lora.step_embedding import StepConditions, without_step_condition
from tdm_train.presets import RECORDED_GRID_OPTION

from .positional_lora import convert_for_model, read_positional_list
from .sampling import CATEGORY
from .step_condition import attach, describe
from .v3_api import io, ui

NOT_LOADED_PREFIX = "lora key not loaded: "
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class _CollectNotLoaded(logging.Handler):
    """Collects the keys comfy.lora.load_lora reports as not loaded (it only logs them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(NOT_LOADED_PREFIX):
            self.keys.append(message[len(NOT_LOADED_PREFIX):])


@contextlib.contextmanager
def _collect_not_loaded():
    handler = _CollectNotLoaded()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.keys
    finally:
        root.removeHandler(handler)


def remember_grid(patched, metadata: dict) -> None:
    """The LoRA's trained timesteps (tdm.timesteps) on the MODEL, for the samplers' preset "recorded"."""
    import json

    try:
        grid = json.loads(metadata.get("tdm.timesteps", "null"))
    except (json.JSONDecodeError, TypeError):
        return
    if isinstance(grid, list) and grid and all(isinstance(t, int) for t in grid):
        patched.model_options[RECORDED_GRID_OPTION] = grid


def _read_lora(model, lora_name: str) -> tuple[dict, dict | None, str | None]:
    """(state dict, metadata, how it was converted or None). Pickled files (.pt / .ckpt: the official
    tdm_dreamshaper.pt, tdm_sd3-5_lora.ckpt) go through the weights-only unpickler only; a
    positional ``ema_parameters`` list is converted for ``model`` (nodes/positional_lora.py). A pickled
    ordinary LoRA is then read a second time by ComfyUI's own loader, which unwraps it as ComfyUI
    does (and in 0.38 annotates its storage): small files, and no copy of that logic here."""
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    try:
        values = None if path.lower().endswith(SAFETENSORS_SUFFIXES) else read_positional_list(path)
        if values is None:
            state_dict, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
            return state_dict, metadata, None
    except pickle.UnpicklingError as error:  # never pass on torch's advice to disable the safe loader
        raise ValueError(f"TDM LoRA Loader: {unsafe_pickle(lora_name, error)}") from None
    except Exception as error:
        raise ValueError(f"TDM LoRA Loader: cannot read {lora_name}: {error}") from error
    try:
        state_dict, metadata = convert_for_model(model, values, lora_name)
    except ValueError as error:
        raise ValueError(f"TDM LoRA Loader: {error}") from None
    return state_dict, metadata, (f"converted on load from its positional list ({len(values)} tensors: "
                                  f"{metadata['tdm.release']}, rank {metadata['ss_network_dim']}, "
                                  f"alpha {metadata['ss_network_alpha']})")


def apply_tdm_lora(model, lora_name: str, strength_source: str, strength: float):
    """Returns (patched model clone, summary). Refuses a LoRA none of whose keys fit the model,
    naming the keys; warns (and reports) when only some of them fit. A TDM-unify LoRA's step
    condition (tdm_step_embedding.k<K>) is not a weight patch: it goes on the MODEL as an
    apply_model wrapper that the TDM samplers tell K (nodes/step_condition.py)."""
    state_dict, metadata, conversion = _read_lora(model, lora_name)
    metadata = metadata or {}  # a pickled file has none
    recommendation = recommend(metadata, lora_name)
    if strength_source == "recorded":
        if recommendation is None:
            applied, source = strength, "nothing recorded; the strength input"
        else:
            applied, source = recommendation.strength, recommendation.source
    else:
        applied, source = strength, "manual"

    conditions = StepConditions.from_state(state_dict, metadata, lora_name)
    state_dict = without_step_condition(state_dict)  # not LoRA weights: load_lora would report them
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    converted = comfy.lora_convert.convert_lora(state_dict)
    with _collect_not_loaded() as unmatched:
        patches = comfy.lora.load_lora(converted, key_map)
    if not patches:
        raise ValueError(
            f"TDM LoRA Loader: {lora_name} is not a LoRA for this model "
            f"({type(model.model).__name__}); {describe_unmatched(unmatched or list(converted), len(converted))}"
        )
    patched = model.clone()
    patched.add_patches(patches, applied)
    remember_grid(patched, metadata)
    lines = [f"{lora_name}: strength {applied:g} ({source}); {len(patches)} weights patched"]
    if conversion:
        lines.append(conversion)
    if conditions is not None:
        lines.append(describe(attach(patched, conditions, lora_name)))
    if unmatched:
        warning = describe_unmatched(unmatched, len(converted))
        logging.warning("TDM LoRA Loader: %s", warning)
        lines.append("WARNING: " + warning)
    if recommendation is not None and recommendation.sampling:
        lines.append("recommended sampling: " + ", ".join(f"{k}={v}" for k, v in recommendation.sampling.items()))
    return patched, "\n".join(lines)


class TDMLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMLoraLoader",
            display_name="TDM LoRA Loader",
            category=CATEGORY,
            description="Applies a TDM LoRA to the diffusion model at the strength recorded for it (its tdm.* "
                        "metadata, or the official release's, e.g. 0.125 for the TDM SD3 LoRA) unless set "
                        "manually, and reports LoRA keys that did not load. A TDM-unify LoRA (one student for "
                        "several step counts) also carries its step condition, which the TDM Sampler and TDM "
                        "KSampler set to the number of steps they sample. The official TDM SD3.5-Medium .ckpt (a "
                        "positional parameter list) is converted on load for the SD3 / SD3.5 model it is applied to.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Combo.Input("strength_source", options=["recorded", "manual"], default="recorded",
                               tooltip="recorded: the LoRA's own strength (falls back to the strength input)"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.005),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_source, strength) -> io.NodeOutput:
        patched, summary = apply_tdm_lora(model, lora_name, strength_source, strength)
        logging.info("TDM LoRA Loader: %s", summary.replace("\n", "; "))
        return io.NodeOutput(patched, ui=ui.PreviewText(summary))


NODES = [TDMLoraLoader]
