"""The shipped workflows: well-formed UI format 0.4, an API twin that is the same graph, a
thumbnail each, only node ids that exist, and files that match their generator."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# ComfyUI core nodes the workflows use (the integration test checks them against /object_info)
CORE_NODES = {"CheckpointLoaderSimple", "PreviewImage", "SaveAnimatedWEBP", "UNETLoader", "CLIPLoader", "VAELoader",
              "TripleCLIPLoader", "CLIPTextEncode",
              "ConditioningZeroOut", "EmptyLatentImage", "EmptySD3LatentImage", "VAEDecode", "SaveImage",
              "SamplerCustom"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def _our_node_ids() -> set[str]:
    source = "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py"))
    return set(re.findall(r'node_id="(TDM\w+)"', source))


def test_there_are_the_workflows_the_issue_names():
    names = {p.stem for p in WORKFLOWS}
    assert {"sdxl_tdm_lora_4step", "pixart_alpha_tdm_4step", "sd3_medium_tdm_lora_4step"} <= names
    assert _our_node_ids() >= {"TDMScheduler", "TDMSampler", "TDMKSampler", "TDMLoraLoader"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_0_4_is_well_formed(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max((l[0] for l in wf["links"]), default=0)
    allowed = _our_node_ids() | CORE_NODES | FRONTEND_ONLY
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, (path.name, node.get("id"), key)
        assert node["type"] in allowed, f"{path.name}: {node['type']} is neither ours nor ComfyUI core"
        assert node["mode"] == 0
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == typ
    linked = {l[0] for l in wf["links"]}
    for node in wf["nodes"]:
        for inp in node["inputs"]:
            assert inp["link"] is None or inp["link"] in linked
            if inp["link"] is None:
                assert inp.get("shape") == 7, f"{path.name}: required input {node['type']}.{inp['name']} unlinked"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_models_are_named_with_urls_and_used(path):
    wf = json.loads(path.read_text())
    assert wf["models"], "models[] names the files the workflow needs"
    used = {v for n in wf["nodes"] for v in n["widgets_values"] if isinstance(v, str)}
    for model in wf["models"]:
        assert model["url"].startswith("https://") and model["directory"] and model["name"] in used


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_thumbnail_and_api_twin(path):
    from PIL import Image

    import hashlib

    # a screenshot of this very file in ComfyUI's frontend (tests/comfyui/check_frontend.py): its comment
    # names the workflow it shows; TDM_UPDATE_THUMBNAILS=1 on the frontend test redoes a stale one
    with Image.open(path.with_suffix(".jpg")) as thumb:
        assert thumb.format == "JPEG" and thumb.size[0] >= 800
        shown = thumb.info.get("comment", b"").decode()
    assert shown == f"workflow sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}", \
        f"{path.with_suffix('.jpg').name} shows another version of {path.name}: rerun the frontend test with TDM_UPDATE_THUMBNAILS=1"
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    real = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert set(api) == set(real)
    for node_id, entry in api.items():
        node = real[node_id]
        assert entry["class_type"] == node["type"]
        literals = [v for v in entry["inputs"].values() if not isinstance(v, list)]
        widgets = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert literals == widgets
        for name, value in entry["inputs"].items():
            if isinstance(value, list):
                source, slot = value
                assert source in api and slot < len(real[source]["outputs"])
                assert any(i["name"] == name and i["link"] is not None for i in node["inputs"])


def test_files_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_workflows"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for path in WORKFLOWS:
        assert (tmp_path / path.name).read_text() == path.read_text(), f"rerun workflows/build.py ({path.name})"
        assert (tmp_path / "api" / path.name).read_text() == (path.parent / "api" / path.name).read_text()


def test_sd3_workflow_carries_the_official_lora_settings():
    api = json.loads((ROOT / "workflows" / "api" / "sd3_medium_tdm_lora_4step.json").read_text())
    sampler = next(n for n in api.values() if n["class_type"] == "TDMKSampler")["inputs"]
    loader = next(n for n in api.values() if n["class_type"] == "TDMLoraLoader")["inputs"]
    assert sampler["preset"] == "flow_shifted" and sampler["shift"] == 6.0 and sampler["cfg"] == 1.0
    assert loader["strength_source"] == "recorded"
    from tdm_train.lora.metadata import recommend

    assert recommend({}, loader["lora_name"]).strength == 0.125


def test_training_workflow_trains_at_the_familys_recommended_guidance():
    api = json.loads((ROOT / "workflows" / "api" / "sdxl_tdm_train_lora.json").read_text())
    train = next(n for n in api.values() if n["class_type"] == "TDMTrainLoRA")["inputs"]
    assert train["training_cfg"] == 0.0  # auto: SDXL's 8 (tdm_train/recipes.py), as python -m tdm_train
