"""Test double of ComfyUI 0.3.64's ``folder_paths`` (commit a125cd84): a fixed file list."""

FILENAME_LIST = ["tdm_sd3_lora.safetensors", "tdm_sdxl_lora.safetensors", "subfolder/other_lora.safetensors"]


def get_filename_list(folder_name: str) -> list[str]:
    """The same fixed list for every folder (a fresh copy, as ComfyUI returns a new list)."""
    return list(FILENAME_LIST)
