"""nodes/patchers.py: ComfyUI 0.38's dynamic-VRAM patcher is swapped for its classic clone before
the export and the trainer touch weights; ComfyUI 0.3.64's patchers (no is_dynamic) pass through;
the in_training flag is set only where ComfyUI has it, and restored."""

import pytest

from conftest import submodule


class ClassicPatcher:  # ComfyUI 0.3.64: no is_dynamic, clone() takes no arguments
    def clone(self):
        return ClassicPatcher()


class DynamicPatcher:  # ComfyUI 0.38's ModelPatcherDynamic, as far as the nodes use it
    def __init__(self, can_copy=True):
        self.can_copy = can_copy
        self.cloned_with = None

    def is_dynamic(self):
        return True

    def clone(self, disable_dynamic=False):
        if not self.can_copy:
            raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
        self.cloned_with = disable_dynamic
        return ClassicPatcher()


def test_a_dynamic_patcher_becomes_its_classic_clone_and_a_classic_one_stays(pack):
    patchers = submodule(pack, "patchers")
    classic = ClassicPatcher()
    assert patchers.classic_patcher(classic, "X") is classic
    dynamic = DynamicPatcher()
    assert isinstance(patchers.classic_patcher(dynamic, "X"), ClassicPatcher) and dynamic.cloned_with is True
    with pytest.raises(ValueError, match="TDM Export Engine: .* restart ComfyUI with --disable-dynamic-vram"):
        patchers.classic_patcher(DynamicPatcher(can_copy=False), "TDM Export Engine")


def test_in_training_is_set_only_where_comfyui_has_it(pack, stubs, monkeypatch):
    patchers = submodule(pack, "patchers")
    mm = stubs["comfy.model_management"]
    assert not hasattr(mm, "in_training")  # 0.3.64
    with patchers.training_mode():
        assert not hasattr(mm, "in_training")
    monkeypatch.setattr(mm, "in_training", False, raising=False)  # 0.38
    with patchers.training_mode():
        assert mm.in_training is True
    assert mm.in_training is False
