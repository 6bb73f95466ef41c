"""Test double of ComfyUI 0.3.64's ``comfy_api`` package (commit a125cd84): empty."""
