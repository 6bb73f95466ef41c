"""Test double of ComfyUI 0.3.64's ``comfy.k_diffusion.sampling`` (commit a125cd84): empty (the
nodes only use it while sampling with eta > 0, which the schema tests never do)."""
