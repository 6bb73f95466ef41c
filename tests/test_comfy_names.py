"""Every ComfyUI name the nodes use, in one list (COMFY_NAMES): a test keeps the list complete
(it parses nodes/*.py), and with COMFYUI_DIR each name is resolved in that ComfyUI checkout with its
own Python. The ComfyUI versions checked and how are in the README (section "Install into ComfyUI")."""

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("comfy", "comfy_api", "folder_paths", "latent_preview")

# module.attribute as the nodes write them (modules themselves where a node imports a whole module)
COMFY_NAMES = sorted([
    "comfy.k_diffusion.sampling.default_noise_sampler",
    "comfy.ldm.modules.attention.attention_pytorch",
    "comfy.lora.load_lora",
    "comfy.lora.model_lora_keys_unet",
    "comfy.lora_convert.convert_lora",
    "comfy.model_base.BaseModel",
    "comfy.model_base.ModelType",
    "comfy.model_base.ModelType.EPS",
    "comfy.model_base.ModelType.FLOW",
    "comfy.model_base.ModelType.V_PREDICTION",
    "comfy.model_base.PixArt",
    "comfy.model_base.SD3",
    "comfy.model_base.SDXL",
    "comfy.model_management.InterruptProcessingException",
    "comfy.model_management.get_torch_device",
    "comfy.model_management.intermediate_device",
    "comfy.model_management.load_models_gpu",
    "comfy.model_management.throw_exception_if_processing_interrupted",
    "comfy.model_management.unet_offload_device",
    "comfy.model_management.unload_all_models",
    "comfy.model_patcher.ModelPatcher",
    "comfy.model_sampling.CONST",
    "comfy.model_sampling.ModelSamplingDiscrete",
    "comfy.model_sampling.V_PREDICTION",
    "comfy.sample.fix_empty_latent_channels",
    "comfy.sample.prepare_noise",
    "comfy.sampler_helpers.convert_cond",
    "comfy.samplers.CFGGuider",
    "comfy.samplers.KSAMPLER",
    "comfy.samplers.encode_model_conds",
    "comfy.supported_models.PixArtAlpha",
    "comfy.supported_models.SD3",
    "comfy.supported_models.SD15",
    "comfy.supported_models.SD20",
    "comfy.supported_models.SDXL",
    "comfy.utils.PROGRESS_BAR_ENABLED",
    "comfy.utils.ProgressBar",
    "comfy.utils.load_torch_file",
    "comfy.utils.unet_to_diffusers",
    "comfy_api.v0_0_2.ComfyExtension",  # nodes/v3_api.py: the numbered V3 API, ComfyUI 0.3.64
    "comfy_api.v0_0_2.io",
    "comfy_api.v0_0_2.ui",
    "folder_paths.add_model_folder_path",
    "folder_paths.folder_names_and_paths",
    "folder_paths.get_filename_list",
    "folder_paths.get_folder_paths",
    "folder_paths.get_full_path",
    "folder_paths.get_full_path_or_raise",
    "folder_paths.get_input_directory",
    "folder_paths.get_output_directory",
    "folder_paths.models_dir",
    "latent_preview.get_previewer",
    "latent_preview.prepare_callback",
])


# names of ComfyUI 0.38 that the nodes use only where they exist (nodes/patchers.py checks first)
NEWER_NAMES = ["comfy.model_management.in_training"]


def _chain(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in ROOTS:
        return ".".join([node.id, *reversed(parts)])
    return None


def used_names() -> set[str]:
    """The longest comfy.* / folder_paths.* / latent_preview.* attribute chains in nodes/*.py."""
    found = set()
    for path in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in inner and (name := _chain(node)):
                found.add(name)
    return found


def test_the_list_holds_every_comfyui_name_the_nodes_use():
    used = used_names()
    modules = {name.rsplit(".", 1)[0] for name in COMFY_NAMES}
    unlisted = sorted(name for name in used if name not in COMFY_NAMES + NEWER_NAMES and name not in modules)
    assert not unlisted, f"add to COMFY_NAMES (and check them in ComfyUI 0.38.x): {unlisted}"
    unused = sorted(n for n in COMFY_NAMES if not n.startswith("comfy_api.")
                    and n not in used and not any(u.startswith(n + ".") for u in used))
    assert not unused, f"no longer used, drop from COMFY_NAMES: {unused}"


RESOLVE = """
import importlib, json, sys
names = json.loads(sys.argv[1])
sys.argv[1:] = ["--cpu"]  # as main.py: comfy.cli_args parses the command line once enabled, before any import of
import comfy.options       # comfy.model_management (which otherwise initialises CUDA)
comfy.options.enable_args_parsing()
missing = []
for name in names:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    try:
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
    except AttributeError:
        missing.append(name)
print(json.dumps(missing))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set: no ComfyUI checkout to "
                    "resolve the names in")
def test_every_listed_name_exists_in_the_comfyui_checkout():
    python = os.environ.get("COMFYUI_PYTHON", "python")
    done = subprocess.run([python, "-c", RESOLVE, json.dumps(COMFY_NAMES)], cwd=os.environ["COMFYUI_DIR"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.environ["COMFYUI_DIR"]})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
