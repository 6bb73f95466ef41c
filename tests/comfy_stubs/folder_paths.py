"""Test double of ComfyUI 0.3.64's ``folder_paths`` (commit a125cd84): a fixed file list, and the
folder registry calls the pack makes (``add_model_folder_path`` keeps ComfyUI's semantics)."""

import os
import tempfile

FILENAME_LIST = ["tdm_sd3_lora.safetensors", "tdm_sdxl_lora.safetensors", "subfolder/other_lora.safetensors"]
models_dir = os.path.join(tempfile.gettempdir(), "comfy_stub_models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def get_filename_list(folder_name: str) -> list[str]:
    """The same fixed list for every folder (a fresh copy, as ComfyUI returns a new list)."""
    return list(FILENAME_LIST)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths, _ = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path not in paths:
        paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_full_path(folder_name: str, filename: str) -> str | None:
    for folder in folder_names_and_paths.get(folder_name, ([], set()))[0]:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def get_input_directory() -> str:
    return os.path.join(tempfile.gettempdir(), "comfy_stub_input")


def get_output_directory() -> str:
    return os.path.join(tempfile.gettempdir(), "comfy_stub_output")
