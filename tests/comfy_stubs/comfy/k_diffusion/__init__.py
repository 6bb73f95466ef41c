"""Test double of ComfyUI 0.3.64's ``comfy.k_diffusion`` (commit a125cd84): empty."""
