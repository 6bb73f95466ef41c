"""Without ComfyUI: every node's schema builds against test doubles of ComfyUI 0.3.64's API
(tests/comfy_stubs), the TDM sampler decides max_denoise as intended, and the V3 entry point
lists the nodes. The doubles have ComfyUI 0.3.64's constructor signatures, so a keyword ComfyUI
does not know fails here too."""

import ast
import asyncio
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_stubs import HERE as STUBS_DIR
from conftest import submodule as _submodule

SIGMA_MAX = 14.6146  # SDXL's sigma at t = 999
SDXL_TDM_SIGMAS = [8.3028, 3.0098, 1.3672, 0.6299, 0.0]  # t = 899, 674, 449, 224, then 0


@pytest.fixture
def schemas(pack):
    """node_id -> Schema for every class of nodes.node_classes()."""
    classes = _submodule(pack, "").node_classes()
    built = [cls.define_schema() for cls in classes]
    by_id = {schema.node_id: schema for schema in built}
    assert len(by_id) == len(built), f"duplicate node ids: {[s.node_id for s in built]}"
    return by_id


def _ids(items):
    return [item.id for item in items]


def test_every_node_schema_builds_with_a_unique_tdm_id_the_tdm_category_and_a_display_name(pack, stubs, schemas):
    io = stubs["comfy_api.latest._io"]
    classes = _submodule(pack, "").node_classes()
    assert classes and all(issubclass(cls, io.ComfyNode) for cls in classes)
    assert set(schemas) == {"TDMScheduler", "TDMSampler", "TDMKSampler", "TDMLoraLoader", "TDMExportEngine",
                            "TDMEngineLoader", "TDMTrainLoRA", "TDMCogVideoXLoader", "TDMCogVideoXLoRA",
                            "TDMCogVideoXTextEncode", "TDMCogVideoXSampler", "TDMCogVideoXDecode"}
    for node_id, schema in schemas.items():
        assert isinstance(schema, io.Schema)
        schema.validate()  # input/output ids unique, as ComfyUI checks when it registers the node
        assert node_id.startswith("TDM")
        expected = ("TDM/export" if "Engine" in node_id else "training/TDM" if "Train" in node_id
                    else "TDM/CogVideoX" if "CogVideoX" in node_id else "sampling/TDM")
        assert schema.category == expected
        assert isinstance(schema.display_name, str) and schema.display_name.strip()
        assert schema.description
        assert schema.outputs and all(isinstance(o, io.Output) for o in schema.outputs)
        assert all(isinstance(i, io.Input) for i in schema.inputs)


def test_scheduler_inputs_in_order_and_sigmas_output(stubs, schemas):
    io = stubs["comfy_api.latest._io"]
    schema = schemas["TDMScheduler"]
    assert _ids(schema.inputs) == ["model", "preset", "steps", "total_steps", "shift", "custom_timesteps", "denoise"]
    assert isinstance(schema.inputs[0], io.Model.Input)
    assert [o.io_type for o in schema.outputs] == ["SIGMAS"]
    preset = schema.inputs[1]
    assert isinstance(preset, io.Combo.Input) and preset.default in preset.options


def test_ksampler_takes_an_optional_negative_last_and_a_seed_with_control_after_generate(stubs, schemas):
    io = stubs["comfy_api.latest._io"]
    schema = schemas["TDMKSampler"]
    negative = schema.inputs[-1]
    assert negative.id == "negative" and negative.optional and negative.io_type == "CONDITIONING"
    assert not any(i.optional for i in schema.inputs[:-1])
    seed = {i.id: i for i in schema.inputs}["seed"]
    assert isinstance(seed, io.Int.Input) and seed.control_after_generate is True
    assert [o.io_type for o in schema.outputs] == ["LATENT"]


def test_sampler_node_outputs_a_sampler(schemas):
    assert [o.io_type for o in schemas["TDMSampler"].outputs] == ["SAMPLER"]


def test_lora_loader_offers_comfyuis_lora_list(stubs, schemas):
    lora_name = {i.id: i for i in schemas["TDMLoraLoader"].inputs}["lora_name"]
    assert lora_name.io_type == "COMBO"
    assert lora_name.options == stubs["folder_paths"].FILENAME_LIST
    assert [o.io_type for o in schemas["TDMLoraLoader"].outputs] == ["MODEL"]


def test_tdm_sampler_is_a_ksampler_with_eta_as_its_only_extra_option(pack, stubs):
    sampling = _submodule(pack, "sampling")
    ksampler = stubs["comfy.samplers"].KSAMPLER
    sampler = sampling.tdm_sampler(0.3)
    assert isinstance(sampler, ksampler) and type(sampler) is not ksampler
    assert sampler.extra_options == {"eta": 0.3}
    assert sampler.sampler_function is sampling.tdm_sampler_function


def _model_wrap():
    return SimpleNamespace(inner_model=SimpleNamespace(model_sampling=SimpleNamespace(sigma_max=SIGMA_MAX)))


@pytest.mark.parametrize("latent, mask, expected", [
    (torch.zeros(1, 4, 8, 8), None, True),  # txt2img: start from pure N(0, I) at t = 899
    (torch.full((1, 4, 8, 8), 0.5), None, False),  # img2img: noise * sigma + latent, as ComfyUI
    (torch.zeros(1, 4, 8, 8), torch.ones(1, 1, 8, 8), False),  # inpainting (a denoise mask)
], ids=["txt2img", "img2img", "inpaint"])
def test_max_denoise_below_sigma_max_only_for_txt2img(pack, latent, mask, expected):
    sampler = _submodule(pack, "sampling").tdm_sampler(0.0)
    sigmas = torch.tensor(SDXL_TDM_SIGMAS)
    model_wrap = _model_wrap()
    assert sigmas[0] < SIGMA_MAX and sampler.max_denoise(model_wrap, sigmas) is False  # before sample()
    noise = torch.randn(1, 4, 8, 8)
    assert sampler.sample(model_wrap, sigmas, {}, None, noise, latent_image=latent, denoise_mask=mask) is noise
    assert sampler.max_denoise(model_wrap, sigmas) is expected


def test_max_denoise_at_sigma_max_is_comfyuis_even_for_img2img(pack):
    sampler = _submodule(pack, "sampling").tdm_sampler(0.0)
    sigmas = torch.tensor([SIGMA_MAX, 1.0, 0.0])
    sampler.sample(_model_wrap(), sigmas, {}, None, torch.randn(1, 4, 8, 8), latent_image=torch.ones(1, 4, 8, 8))
    assert sampler.max_denoise(_model_wrap(), sigmas) is True


def test_entry_point_extension_lists_exactly_the_node_classes(pack, stubs):
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, stubs["comfy_api.latest"].ComfyExtension)
    assert asyncio.run(extension.get_node_list()) == _submodule(pack, "").node_classes()


def test_nodes_import_the_numbered_v3_api_and_fall_back_to_latest_explicitly(pack, stubs, monkeypatch, caplog):
    v3_api = _submodule(pack, "v3_api")
    assert v3_api.SOURCE == "comfy_api.v0_0_2"  # what ComfyUI 0.3.64 provides
    assert v3_api.io is stubs["comfy_api.latest"].io and v3_api.ComfyExtension is stubs["comfy_api.latest"].ComfyExtension
    # a ComfyUI without the numbered version: latest, said in the log
    monkeypatch.setitem(sys.modules, "comfy_api.v0_0_2", None)  # `import` raises ImportError
    with caplog.at_level("WARNING"):
        module, name = v3_api.resolve()
    assert name == "comfy_api.latest" and module is stubs["comfy_api.latest"]
    assert "no numbered comfy_api version" in caplog.text and "comfy_api.v0_0_2" in caplog.text
    # a numbered version that lacks a name is passed over, naming what it lacks
    partial = types.ModuleType("comfy_api.v0_0_3")
    partial.io = stubs["comfy_api.latest"].io
    monkeypatch.setitem(sys.modules, "comfy_api.v0_0_3", partial)
    module, name = v3_api.resolve(("comfy_api.v0_0_3", "comfy_api.latest"))
    assert name == "comfy_api.latest" and "comfy_api.v0_0_3 lacks ui, ComfyExtension" in caplog.text
    monkeypatch.setitem(sys.modules, "comfy_api.latest", None)
    with pytest.raises(ImportError, match="need ComfyUI's V3 API"):
        v3_api.resolve()


@pytest.mark.parametrize("build", [
    lambda io: io.Int.Input("x", advanced=True),
    lambda io: io.Combo.Input("x", options=["a"], force_input=True),  # Combo has no force_input in 0.3.64
    lambda io: io.Model.Input("model", default=None),  # socket-only inputs take no default
    lambda io: io.Sigmas.Output(name="SIGMAS"),
    lambda io: io.Schema(node_id="X", search_aliases=["y"]),
], ids=["Int.advanced", "Combo.force_input", "Model.default", "Output.name", "Schema.search_aliases"])
def test_stub_refuses_keywords_unknown_to_comfyui_0_3_64(stubs, build):
    with pytest.raises(TypeError):
        build(stubs["comfy_api.latest._io"])


def test_stubs_do_not_outlive_their_test():
    assert not any(name == "comfy" or name.startswith(("comfy.", "comfy_api")) for name in sys.modules)
    assert "folder_paths" not in sys.modules and "latent_preview" not in sys.modules


# --- the doubles against ComfyUI's own source (needs COMFYUI_DIR, as the integration tests) ---

def _init_params(tree, path):
    """Parameters (name, kind, default source) of the __init__ of class `path` ("Int.Input")."""
    body = tree.body
    for name in path.split("."):
        node = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == name)
        body = node.body
    init = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    a = init.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    params = [(p.arg, "positional", d) for p, d in zip(positional, defaults)]
    params += [(p.arg, "keyword-only", None if d is None else ast.unparse(d)) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    params += [("*" + a.vararg.arg, "var", None)] if a.vararg else []
    params += [("**" + a.kwarg.arg, "var", None)] if a.kwarg else []
    return params


def _dataclass_fields(tree, name):
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    return [(f.target.id, None if f.value is None else ast.unparse(f.value))
            for f in node.body if isinstance(f, ast.AnnAssign)]


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set: no ComfyUI source to compare with")
def test_stub_signatures_equal_comfyuis():
    latest = Path(os.environ["COMFYUI_DIR"]) / "comfy_api" / "latest"
    real_io = ast.parse((latest / "_io.py").read_text())
    stub_io = ast.parse((STUBS_DIR / "comfy_api" / "latest" / "_io.py").read_text())
    for cls in ["Input", "WidgetInput", "Output", "NodeOutput", "Boolean.Input", "Int.Input", "Float.Input",
                "String.Input", "Combo.Input", "Combo.Output"]:
        assert _init_params(stub_io, cls) == _init_params(real_io, cls), cls
    assert _dataclass_fields(stub_io, "Schema") == _dataclass_fields(real_io, "Schema")
    real_ui = ast.parse((latest / "_ui.py").read_text())
    stub_ui = ast.parse((STUBS_DIR / "comfy_api" / "latest" / "_ui.py").read_text())
    assert _init_params(stub_ui, "PreviewText") == _init_params(real_ui, "PreviewText")
    real_samplers = ast.parse((Path(os.environ["COMFYUI_DIR"]) / "comfy" / "samplers.py").read_text())
    stub_samplers = ast.parse((STUBS_DIR / "comfy" / "samplers.py").read_text())
    assert _init_params(stub_samplers, "KSAMPLER") == _init_params(real_samplers, "KSAMPLER")


def test_export_node_widgets_and_engine_loader_lists_only_exports_with_a_manifest(pack, stubs, schemas, tmp_path,
                                                                                 monkeypatch):
    folder_paths = stubs["folder_paths"]
    export = {i.id: i for i in schemas["TDMExportEngine"].inputs}
    assert list(export) == ["model", "name", "dtype", "batch_max", "height_min", "height_opt", "height_max",
                            "width_min", "width_opt", "width_max", "context_max", "timesteps", "build_tensorrt_engine", "num_steps"]
    assert schemas["TDMExportEngine"].is_output_node
    assert [o.io_type for o in schemas["TDMEngineLoader"].outputs] == ["MODEL"]

    engines = _submodule(pack, "engines")
    root = tmp_path / "tensorrt"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "tensorrt", ([str(root)], set()))
    engines.register_engine_folder()
    assert folder_paths.folder_names_and_paths["tensorrt"][1] >= {".engine", ".onnx"}
    for relative in ("good/model.opt.onnx", "good/model.onnx", "good/sdxl_fp16_b1-1-2_trt10.13.3_sm89.engine",
                     "stray/model.opt.onnx"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    (root / "good" / "engine.json").write_text("{}")
    monkeypatch.setattr(folder_paths, "get_filename_list",
                        lambda name: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))
    assert engines.exported_files() == ["good/model.opt.onnx", "good/sdxl_fp16_b1-1-2_trt10.13.3_sm89.engine"]

    assert engines.output_folder("students/sdxl") == (root / "students" / "sdxl").resolve()
    for bad in ("../outside", "/abs/path", "a/../../b", "", "."):
        with pytest.raises(ValueError, match="refusing|relative folder name"):
            engines.output_folder(bad)
