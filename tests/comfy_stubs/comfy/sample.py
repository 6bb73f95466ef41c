"""Test double of ComfyUI 0.3.64's ``comfy.sample`` (commit a125cd84): empty (the nodes only use it
in execute(), which the schema tests never run)."""
