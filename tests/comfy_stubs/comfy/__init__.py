"""Test double of ComfyUI 0.3.64's ``comfy`` package (commit a125cd84): empty."""
