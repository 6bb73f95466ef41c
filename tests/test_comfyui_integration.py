"""The pack inside a real ComfyUI: loads without import failure, /object_info lists our nodes
with the widgets our workflow files use, and shipped workflows run end to end on tiny models.

Needs COMFYUI_DIR (a ComfyUI checkout) and, unless this interpreter can run ComfyUI,
COMFYUI_PYTHON (the Python of ComfyUI's environment). Skipped with the reason otherwise.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="COMFYUI_DIR is not set: ComfyUI integration tests need a ComfyUI checkout "
                            "(and COMFYUI_PYTHON, its environment's Python)"
)

TDM_NODES = {"TDMScheduler", "TDMSampler", "TDMKSampler", "TDMLoraLoader"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return response.status, json.loads(body) if body.strip() else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A ComfyUI server on 127.0.0.1 with this pack and tiny models; yields (base url, dirs, log path)."""
    base = tmp_path_factory.mktemp("comfy")
    env = {**os.environ, "PYTHONPATH": COMFYUI_DIR}
    made = subprocess.run([COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / "make_tiny_models.py"), str(base / "models")],
                          cwd=COMFYUI_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    packs = base / "packs"
    packs.mkdir()
    (packs / "ComfyUI-TDM").symlink_to(ROOT, target_is_directory=True)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(
        "tdm_tests:\n"
        "  is_default: true\n"  # these folders first: what the nodes write lands here, not in the checkout
        f"  custom_nodes: {packs}\n"
        f"  checkpoints: {base / 'models' / 'checkpoints'}\n"
        f"  loras: {base / 'models' / 'loras'}\n"
        f"  tensorrt: {base / 'models' / 'tensorrt'}\n"
        f"  CogVideo: {base / 'models' / 'CogVideo'}\n"
    )
    port = _free_port()
    log = base / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--extra-model-paths-config", str(yaml), "--output-directory", str(base / "output"),
             "--preview-method", "none"],
            cwd=COMFYUI_DIR, stdout=log_file, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                _get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("ComfyUI did not start:\n" + log.read_text()[-4000:])
                time.sleep(1)
        yield url, base, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _run_prompt(url: str, prompt: dict, timeout: float = 300) -> dict:
    status, answer = _post(url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "success" or not entry["status"]["completed"]:
                return entry
            return entry
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout}s")


def test_pack_loads_and_object_info_lists_the_tdm_nodes(comfy):
    url, _, log = comfy
    text = log.read_text()
    assert "IMPORT FAILED" not in "\n".join(line for line in text.splitlines() if "ComfyUI-TDM" in line)
    # the nodes took ComfyUI's numbered V3 API, not the in-development comfy_api.latest (nodes/v3_api.py)
    assert "ComfyUI-TDM: V3 API from comfy_api.v0_0_2" in text and "no numbered comfy_api version" not in text
    info = _get(url + "/object_info")
    assert TDM_NODES <= set(info)
    for node in TDM_NODES:
        assert info[node]["category"] == "sampling/TDM"
    assert info["TDMKSampler"]["input"]["optional"] == {"negative": ["CONDITIONING", {}]} or \
        "negative" in info["TDMKSampler"]["input"]["optional"]


def _frontend_missing() -> str | None:
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "headless Chromium is not installed (apt-get install chromium chromium-driver)"
    probe = subprocess.run([COMFYUI_PYTHON, "-c", "import selenium"], capture_output=True, text=True)
    if probe.returncode:
        return f"selenium is not installed in ComfyUI's environment ({COMFYUI_PYTHON} -m pip install selenium)"
    return None


def test_every_workflow_opens_in_comfyuis_own_frontend(comfy):
    """Each file in workflows/ loaded in ComfyUI's real frontend (comfyui-frontend-package) as a drop
    does: every node type known, every widget value kept after load and after save, a TDM widget edit
    reaching the API prompt, and that prompt accepted by ComfyUI's validation for every TDM node."""
    missing = _frontend_missing()
    if missing:
        pytest.skip(missing)
    url, base, _ = comfy
    files = sorted(str(p) for p in (ROOT / "workflows").glob("*.json"))
    # the thumbnails are these screenshots: TDM_UPDATE_THUMBNAILS=1 writes them into workflows/
    shots = ROOT / "workflows" if os.environ.get("TDM_UPDATE_THUMBNAILS") else base / "screenshots"
    shots.mkdir(exist_ok=True)
    done = subprocess.run([COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / "check_frontend.py"), url,
                           json.dumps(files), str(shots)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    problems = {}
    for path in files:
        result, workflow = results[path], json.loads(Path(path).read_text())
        name = Path(path).name
        if "error" in result:
            problems[name] = result["error"][:500]
            continue
        wrong = [f"{n['type']} {n['id']}: file {n.get('widgets_values')} saved {result['saved'][str(n['id'])]}"
                 for n in workflow["nodes"] if (n.get("widgets_values") or []) != result["saved"][str(n["id"])]]
        if result["missing"] or wrong:
            problems[name] = {"missing node types": result["missing"], "widgets changed": wrong}
        if result["edit"] is not None and result["edit"]["in_prompt"] != result["edit"]["set"]:
            problems.setdefault(name, {})["edit lost"] = result["edit"]
        status, answer = _post(url + "/prompt", {"prompt": result["prompt"], "client_id": "frontend-check",
                                                 "front": False, "number": -1})
        if status != 200:
            tdm_errors = {k: v for k, v in (answer.get("node_errors") or {}).items()
                          if v.get("class_type", "").startswith("TDM")}
            if tdm_errors or not answer.get("node_errors"):
                problems.setdefault(name, {})["validation"] = tdm_errors or answer.get("error")
        else:  # accepted: nothing is meant to run here
            _post(url + "/queue", {"delete": [answer["prompt_id"]]})
    print(json.dumps({k: "ok" for k in map(lambda p: Path(p).name, files) if k not in problems}))
    from PIL import Image, ImageStat

    for path in files:
        with Image.open(shots / (Path(path).stem + ".jpg")) as shot:
            assert shot.size[0] >= 800 and max(ImageStat.Stat(shot).stddev) > 10, path  # a drawn graph, not blank
    assert not problems, json.dumps(problems, indent=1)[:6000]


def test_workflow_widgets_match_the_servers_node_definitions(comfy):
    """Every UI workflow's widgets_values line up with /object_info's input order (a seed adds its
    control value), so the files load into this ComfyUI with the values we wrote."""
    url, _, _ = comfy
    info = _get(url + "/object_info")
    for path in sorted((ROOT / "workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        for node in workflow["nodes"]:
            if node["type"] == "Note":
                continue
            assert node["type"] in info, f"{path.name}: unknown node {node['type']}"
            spec = info[node["type"]]
            order = spec["input_order"]["required"] + spec["input_order"].get("optional", [])
            every = {**spec["input"]["required"], **spec["input"].get("optional", {})}
            sockets = {i["name"] for i in node["inputs"]}
            widgets = [name for name in order if name not in sockets and not _is_socket(every[name])]
            expected_len = sum(2 if every[name][1:] and every[name][1].get("control_after_generate") else 1
                               for name in widgets)
            assert len(node["widgets_values"]) == expected_len, (path.name, node["type"], widgets)


def _is_socket(definition) -> bool:
    kind = definition[0]
    return isinstance(kind, str) and kind.isupper() and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _tiny(prompt: dict, lora: str = "tiny_tdm.safetensors") -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = "tiny_sd15.safetensors"
        if "lora_name" in inputs:
            inputs["lora_name"] = lora
        if "width" in inputs:
            inputs["width"] = inputs["height"] = 64
    return prompt


@pytest.mark.parametrize("name", ["sdxl_tdm_lora_4step", "sd15_dreamshaper_tdm_lora_4step"])
def test_shipped_workflow_runs_end_to_end_on_a_tiny_model(comfy, name):
    url, base, _ = comfy
    prompt = _tiny(json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text()))
    entry = _run_prompt(url, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    outputs = entry["outputs"]
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert len(images) == 1
    saved = base / "output" / images[0]["subfolder"] / images[0]["filename"]
    from PIL import Image

    with Image.open(saved) as image:
        assert image.size == (64, 64)
    summaries = [text for out in outputs.values() for text in out.get("text", [])]
    assert any("strength 0.5 (metadata tdm.lora_strength)" in s for s in summaries), summaries
    assert any("2 of 11 LoRA keys matched no weight" in s and "not_a_module_of_sd15" in s for s in summaries), summaries


def test_a_pickled_lora_loads_weights_only_and_a_code_executing_one_is_refused(comfy, tmp_path):
    """The official Dreamshaper LoRA ships as tdm_dreamshaper.pt (torch.save of a state dict): the TDM LoRA
    Loader reads it through the weights-only unpickler; a pickle that would run code is refused unexecuted."""
    import os

    from safetensors.torch import load_file

    url, base, _ = comfy
    loras = base / "models" / "loras"
    torch.save(load_file(str(loras / "tiny_tdm.safetensors")), loras / "tdm_dreamshaper_tiny.pt")
    entry = _run_prompt(url, _tiny(json.loads((ROOT / "workflows" / "api" / "sd15_dreamshaper_tdm_lora_4step.json")
                                              .read_text()), lora="tdm_dreamshaper_tiny.pt"))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    summaries = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    assert any("9 of 11" not in s and "dreamshaper" in s.lower() for s in summaries), summaries

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Exploit()}, loras / "tdm_evil.pt")
    entry = _run_prompt(url, _tiny(json.loads((ROOT / "workflows" / "api" / "sd15_dreamshaper_tdm_lora_4step.json")
                                              .read_text()), lora="tdm_evil.pt"))
    assert entry["status"]["status_str"] == "error"
    message = [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "not a safe format" in message and "weights_only" not in message and "system" in message
    assert not (tmp_path / "pwned").exists()


def test_lora_for_another_architecture_is_refused_with_its_keys(comfy):
    url, _, _ = comfy
    prompt = _tiny(json.loads((ROOT / "workflows" / "api" / "sd15_dreamshaper_tdm_lora_4step.json").read_text()),
                   lora="not_sd15.safetensors")
    entry = _run_prompt(url, prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    message = errors[0][1]["exception_message"]
    assert "not a LoRA for this model" in message and "transformer.transformer_blocks.0.attn.to_q" in message


def test_sigmas_and_sampler_through_comfyuis_own_model_sampling_and_ksampler():
    """Runs in ComfyUI's Python (no server): the TDM Scheduler's sigmas from ComfyUI's
    ModelSampling classes equal the reference values, and the TDM Sampler driven by ComfyUI's
    KSAMPLER machinery reproduces tdm_sample on an exact teacher."""
    run = subprocess.run(
        [COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / "check_sampler_in_comfy.py"), str(ROOT)],
        cwd=COMFYUI_DIR, env={**os.environ, "PYTHONPATH": COMFYUI_DIR}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["sdxl_sigmas"] == pytest.approx([8.3028, 3.0098, 1.3672, 0.6299, 0.0], abs=1e-4)
    assert out["pixart_sigmas"] == pytest.approx([60.27, 10.02, 2.622, 0.831, 0.0], rel=1e-3)
    assert out["sdxl_timesteps_seen"] == [899.0, 674.0, 449.0, 224.0]
    assert out["ksampler_vs_tdm_sample_max_abs"] < 1e-6
    assert out["stock_scaling_max_abs"] > 1e-3  # ComfyUI's default noise scaling is off the trained start
    assert out["callback_steps"] == [0, 1, 2, 3]
    assert out["eta_half_finite"] and out["eta_half_differs"] > 1e-3
    assert out["flow_model_timesteps"] == pytest.approx([999.83, 947.17, 856.90, 666.37], abs=0.01)


def _check_in_comfy(script: str, *args, timeout: int = 400) -> dict:
    run = subprocess.run([COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / script), str(ROOT), *map(str, args)],
                         cwd=COMFYUI_DIR, env={**os.environ, "PYTHONPATH": COMFYUI_DIR}, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """make_tiny_models.py's files (tiny SD1.5 checkpoint, LoRAs), without a server."""
    out = tmp_path_factory.mktemp("tiny_models")
    made = subprocess.run([COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / "make_tiny_models.py"), str(out)],
                          cwd=COMFYUI_DIR, env={**os.environ, "PYTHONPATH": COMFYUI_DIR}, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return out


def test_unify_lora_conditions_the_student_on_the_steps_the_tdm_samplers_sample(tiny_models, tmp_path):
    """Runs in ComfyUI's Python (no server): a TDM-unify LoRA (kohya keys + c_K for K = 1, 2, 4)
    through the TDM LoRA Loader onto the tiny SD1.5 MODEL, sampled by ComfyUI's guider: the TDM
    KSampler at 2 steps equals the plain LoRA with the library's c_2 hook on time_embed.2, the
    TDM Sampler via sample_custom at 4 steps the c_4 one, img2img (denoise 0.5 on the 4-step grid)
    the c_4 one; an untrained K is refused with the trained list; a stock sampler (euler) runs as
    K = 4 with a warning; no hook stays registered and the loader's input model has no wrapper.
    Then the TDM Export Engine at num_steps 2 and the TDM Engine Loader: the engine samples as the
    PyTorch K = 2 student and refuses 4 steps."""
    out = _check_in_comfy("check_unify_in_comfy.py", tiny_models, tmp_path)
    assert "TDM-unify student for K = 1, 2, 4" in out["summary"] and "3 weights patched" in out["summary"]
    assert out["not_loaded_messages"] == []  # the tdm_step_embedding.k<K> keys never reach comfy.lora.load_lora
    assert out["patches"] == [3, 3]
    assert out["wrapper_keys"] == {"unify": ["tdm_step_condition"], "plain": [], "loader_input": []}
    assert out["clone_keeps_it"] == ["tdm_step_condition"]
    assert out["ksampler_k2_vs_reference"] < 1e-5
    assert out["ksampler_k2_vs_no_condition"] > 1e-3 and out["ksampler_k2_vs_c4"] > 1e-3  # c_K matters, and which K
    assert out["sampler_custom_k4_vs_reference"] < 1e-5
    assert out["img2img_vs_c4"] < 1e-5 and out["img2img_vs_c2"] > 1e-3
    assert "trained for [1, 2, 4] steps, not 3" in out["untrained_error"]
    assert out["euler_vs_c4"] < 1e-5 and len(out["euler_warnings"]) == 1
    for key in ("hooks_after_sampling", "hooks_after_sampler_custom", "hooks_after_refusal", "hooks_at_end",
                "hooks_after_export"):
        assert out[key] == 0, key
    # TDM Export Engine at num_steps 2 -> TDM Engine Loader -> TDM KSampler: the PyTorch student at K = 2
    assert out["manifest"] == {"num_steps": 2, "unify_steps": [1, 2, 4], "timesteps": [899, 449]}
    assert "TDM-unify student exported for K = 2" in out["export_summary"]
    assert out["engine_vs_pytorch_k2"] < 1e-4 * max(1.0, out["scale"])
    assert "exported for 2 sampling steps" in out["engine_other_k_error"] and "not 4" in out["engine_other_k_error"]


def test_unify_training_saves_the_students_condition_and_returns_a_model_that_carries_it(tiny_models, tmp_path):
    """Runs in ComfyUI's Python (no server): TDM Train LoRA with unify_steps 1, 2 (3 steps, tiny
    SD1.5). With a trainer that conditions the student on K (tdm_train's step_conditions(), branch
    unify), the native and diffusers files carry c_1, c_2 (ComfyUI path time_embed.2), the MODEL
    it returns carries the condition and samples exactly as the saved file through the TDM LoRA
    Loader at K = 1 and 2; either way no trainer hook stays on the shared diffusion model."""
    out = _check_in_comfy("check_unify_training_in_comfy.py", tiny_models, tmp_path, timeout=600)
    assert out["hooks_left_on_the_shared_model"] == 0 and out["input_model_wrapper"] == []
    assert not out["lora_model_output_has_condition_keys"]  # LORA_MODEL: weights only, for core's LoRA nodes
    if not out["trainer_conditions_the_student"]:
        assert out["native_condition_keys"] == [] and out["student_wrapper"] == []
        pytest.skip("this tdm_train's trainer does not condition the student on K (TDMTrainer.step_conditions)")
    assert out["native_condition_keys"] == out["diffusers_condition_keys"] == ["tdm_step_embedding.k1",
                                                                               "tdm_step_embedding.k2"]
    assert out["native_step_embedding_metadata"]["comfy_target"] == "time_embed.2"
    assert out["native_step_embedding_metadata"]["steps"] == [1, 2]
    assert min(out["condition_norms"].values()) > 0  # trained away from the zero initialisation
    assert out["student_wrapper"] == ["tdm_step_condition"]
    assert "TDM-unify student for K = 1, 2" in out["summary"] and "TDM-unify student for K = 1, 2" in out["loader_summary"]
    assert out["student_vs_loaded_k1"] < 1e-5 and out["student_vs_loaded_k2"] < 1e-5
    assert out["hooks_after_sampling"] == 0


def test_sdxl_student_lora_names_all_load_in_comfyuis_lora_loader():
    """Every module of an SDXL student LoRA (real SDXL UNet config, default targets and the wide
    LCM/DMD2 list) has a key that ComfyUI's LoRA key map accepts: zero "lora key not loaded"."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trainer_memory import SDXL_UNET, WIDE_TARGETS

    from tdm_train.backends.sdxl import SDXL_LORA_TARGETS
    from tdm_train.lora.export import kohya_state_dict

    run = subprocess.run([COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / "lora_key_map.py")], cwd=COMFYUI_DIR,
                         env={**os.environ, "PYTHONPATH": COMFYUI_DIR}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    comfy_keys = set(json.loads(run.stdout.strip().splitlines()[-1])["keys"])
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    for targets in (SDXL_LORA_TARGETS, WIDE_TARGETS):
        config = LoraConfig(r=4, target_modules=list(targets))
        modules = [name for name, module in unet.named_modules()
                   if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and check_target_module_exists(config, name)]
        fake_state = {}
        for name in modules:
            fake_state[f"{name}.lora_A.weight"] = torch.zeros(1)
            fake_state[f"{name}.lora_B.weight"] = torch.zeros(1)
        exported = {key.rsplit(".", 2)[0] for key in kohya_state_dict(fake_state, 4.0)}
        missing = sorted(exported - comfy_keys)
        assert len(exported) == len(modules) > 100 and not missing, missing[:10]


EXPORT_NODES = {"TDMExportEngine", "TDMEngineLoader"}


def _export_prompt(name: str, build_engine: bool = False, dtype: str = "fp32") -> dict:
    prompt = _tiny(json.loads((ROOT / "workflows" / "api" / "sdxl_tdm_export_tensorrt.json").read_text()))
    for node in prompt.values():
        if node["class_type"] == "TDMExportEngine":
            node["inputs"].update(name=name, dtype=dtype, batch_max=2, height_min=64, height_opt=64, height_max=128,
                                  width_min=64, width_opt=64, width_max=128, build_tensorrt_engine=build_engine)
    return prompt


def _saved_latent(base: Path, entry: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    latents = [item for out in entry["outputs"].values() for item in out.get("latents", [])]
    assert len(latents) == 1
    return load_file(str(base / "output" / latents[0]["subfolder"] / latents[0]["filename"]))["latent_tensor"]


def _latent_output(prompt: dict) -> dict:
    """The prompt with its decode-and-save nodes replaced by SaveLatent (exact float values), and
    the prompt's conditioning zeroed: the tiny checkpoint's text encoder has no trained weights."""
    sampler_id = next(k for k, n in prompt.items() if n["class_type"] == "TDMKSampler")
    kept = {k: n for k, n in prompt.items() if n["class_type"] not in ("VAEDecode", "SaveImage")}
    kept["98"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": kept[sampler_id]["inputs"]["positive"]}}
    kept[sampler_id]["inputs"]["positive"] = ["98", 0]
    kept["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": "tdm_test"}}
    return kept


def test_export_node_then_engine_loader_samples_like_the_pytorch_model(comfy):
    """The tiny SD1.5 MODEL with its TDM LoRA -> ONNX (models/tensorrt/tiny_student) -> TDM Engine
    Loader (ONNX Runtime) -> TDM KSampler: the image equals the PyTorch model's within rounding."""
    url, base, _ = comfy
    info = _get(url + "/object_info")
    assert EXPORT_NODES <= set(info) and info["TDMExportEngine"]["category"] == "TDM/export"
    entry = _run_prompt(url, _export_prompt("tiny_student"))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    folder = base / "models" / "tensorrt" / "tiny_student"
    manifest = json.loads((folder / "engine.json").read_text())
    assert manifest["family"] == "sd15" and manifest["signature"] == "comfyui" and manifest["validation"]["passed"]
    assert manifest["inputs"][0]["profile"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 16]}
    assert manifest["source"]["patches"] > 0  # the LoRA was merged

    options = _get(url + "/object_info/TDMEngineLoader")["TDMEngineLoader"]["input"]["required"]["engine_name"]
    assert "tiny_student/model.opt.onnx" in json.dumps(options)
    engine_prompt = _tiny(json.loads((ROOT / "workflows" / "api" / "sdxl_tdm_engine_4step.json").read_text()))
    for node in engine_prompt.values():
        if node["class_type"] == "TDMEngineLoader":
            node["inputs"]["engine_name"] = "tiny_student/model.opt.onnx"
    engine_prompt = _latent_output(engine_prompt)
    from_engine = _run_prompt(url, engine_prompt)
    assert from_engine["status"]["status_str"] == "success", from_engine["status"]["messages"]

    # the same graph with the PyTorch model (checkpoint + the same LoRA) in place of the engine
    torch_prompt = json.loads(json.dumps(engine_prompt))
    loader_id = next(k for k, n in torch_prompt.items() if n["class_type"] == "TDMEngineLoader")
    checkpoint_id = next(k for k, n in torch_prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    torch_prompt[loader_id] = {"class_type": "TDMLoraLoader", "inputs": {
        "model": [checkpoint_id, 0], "lora_name": "tiny_tdm.safetensors", "strength_source": "recorded",
        "strength": 1.0}}
    from_torch = _run_prompt(url, torch_prompt)
    assert from_torch["status"]["status_str"] == "success", from_torch["status"]["messages"]
    engine_latent, torch_latent = _saved_latent(base, from_engine), _saved_latent(base, from_torch)
    assert engine_latent.shape == torch_latent.shape == (1, 4, 8, 8)
    assert torch_latent.std() > 0.05  # a real sample, not a constant that any model would match
    assert (engine_latent - torch_latent).abs().max() < 1e-4 * torch_latent.abs().max()


def test_engine_loader_refuses_a_failed_export_and_the_export_node_replaces_only_with_a_validated_one(comfy):
    url, base, _ = comfy
    entry = _run_prompt(url, _export_prompt("tiny_refused"))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    folder = base / "models" / "tensorrt" / "tiny_refused"
    # run the node again into the same name: swapped in whole, no side folder left
    again = _export_prompt("tiny_refused")
    for node in again.values():
        if node["class_type"] == "TDMExportEngine":
            node["inputs"]["batch_max"] = 3  # another export, so ComfyUI does not answer from its cache
    entry = _run_prompt(url, again)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert json.loads((folder / "engine.json").read_text())["inputs"][0]["profile"]["max"][0] == 3
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith("tiny_refused.")]

    manifest = json.loads((folder / "engine.json").read_text())
    manifest["validation"]["passed"] = False  # as a diverged student's export would say
    (folder / "engine.json").write_text(json.dumps(manifest))
    engine_prompt = _latent_output(_tiny(json.loads((ROOT / "workflows" / "api" / "sdxl_tdm_engine_4step.json")
                                                    .read_text())))
    loader = next(n for n in engine_prompt.values() if n["class_type"] == "TDMEngineLoader")
    loader["inputs"]["engine_name"] = "tiny_refused/model.opt.onnx"
    refused = _run_prompt(url, engine_prompt)
    assert refused["status"]["status_str"] == "error"
    assert "failed its validation" in json.dumps(refused["status"]["messages"])
    loader["inputs"]["allow_failed_validation"] = True
    allowed = _run_prompt(url, engine_prompt)
    assert allowed["status"]["status_str"] == "success", allowed["status"]["messages"]


def test_fp16_export_of_an_fp32_model_validates_and_leaves_the_model_as_it_was(comfy):
    url, base, _ = comfy
    workflow = json.loads((ROOT / "workflows" / "api" / "sd15_dreamshaper_tdm_lora_4step.json").read_text())
    before = _run_prompt(url, _latent_output(_tiny(json.loads(json.dumps(workflow)))))
    assert before["status"]["status_str"] == "success", before["status"]["messages"]

    entry = _run_prompt(url, _export_prompt("tiny_fp16", dtype="fp16"))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    manifest = json.loads((base / "models" / "tensorrt" / "tiny_fp16" / "engine.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["inputs"][0]["dtype"] == "float16"
    assert manifest["validation"]["passed"] and min(c["cosine"] for c in manifest["validation"]["cases"]) > 0.999

    # the cached MODEL (cast to fp16 for the export) is back to its exact float32 weights: the
    # same sampling (the grid written differently, so ComfyUI runs the sampler again) is bit-equal
    again = _tiny(json.loads(json.dumps(workflow)))
    for node in again.values():
        if node["class_type"] == "TDMKSampler":
            assert node["inputs"]["custom_timesteps"] == "999, 749, 500, 250"
            node["inputs"]["custom_timesteps"] = "999,749,500,250"
    after = _run_prompt(url, _latent_output(again))
    assert after["status"]["status_str"] == "success", after["status"]["messages"]
    assert torch.equal(_saved_latent(base, after), _saved_latent(base, before))


def test_export_node_refuses_paths_outside_models_tensorrt_and_names_missing_tensorrt(comfy):
    url, _, _ = comfy
    outside = _run_prompt(url, _export_prompt("../outside"))
    assert outside["status"]["status_str"] == "error"
    message = [m for m in outside["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "refusing '../outside'" in message
    engine = _run_prompt(url, _export_prompt("tiny_engine", build_engine=True))
    message = [m for m in engine["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "pip install .[trt]" in message


def test_engine_loader_models_reproduce_the_exported_network_under_comfyuis_apply_model(tmp_path):
    """Runs in ComfyUI's Python (no server): tiny SDXL, PixArt-alpha (1024-type, with micro-
    conditions) and SD3.5-shaped exports become ComfyUI models whose schedule is the recorded one and whose
    apply_model (sigma space, ComfyUI's y / c_size / c_ar, unpadded T5 states) gives the x0 of
    the exported network computed directly."""
    import onnxruntime  # noqa: F401
    from export.families import ExportShapes, family_spec
    from export.onnx_export import export_onnx
    from tdm_train.tiny_models import PIXART_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG
    from tdm_train.tiny_models import tiny_pixart_transformer, tiny_sdxl_unet

    from tdm_train.tiny_models import SD3_SCHEDULER_CONFIG, tiny_sd3_transformer

    folders = []
    for family, model, scheduler, text, grid in (
            ("sdxl", tiny_sdxl_unet(), SDXL_SCHEDULER_CONFIG, (8, 8, 16), [899, 674, 449, 224]),
            ("pixart", tiny_pixart_transformer(128), PIXART_SCHEDULER_CONFIG, (16, 16, 16), [899, 674, 449, 224]),
            ("sd3", tiny_sd3_transformer(), {**SD3_SCHEDULER_CONFIG, "shift": 2.5}, (12, 12, 12), [999, 749, 499, 249])):
        shapes = ExportShapes(batch=(1, 2, 2), height=(8, 8, 8), width=(8, 8, 8), text_len=text)
        export_onnx(family_spec(family, model, shapes, "fp32"), tmp_path / family, dtype="fp32", shapes=shapes,
                    scheduler_config=scheduler, timesteps=grid)
        folders.append(str(tmp_path / family))
    run = subprocess.run(
        [COMFYUI_PYTHON, str(ROOT / "tests" / "comfyui" / "check_engine_loader_in_comfy.py"), str(ROOT), *folders],
        cwd=COMFYUI_DIR, env={**os.environ, "PYTHONPATH": COMFYUI_DIR}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    sdxl, pixart, sd3 = out[folders[0]], out[folders[1]], out[folders[2]]
    assert sdxl["comfy_class"] == "SDXL" and pixart["comfy_class"] == "PixArt" and sd3["comfy_class"] == "SD3"
    for result in (sdxl, pixart, sd3):  # SD3: the recorded shift 2.5 (not SD3's default 3) in ComfyUI's sigmas
        assert result["sigma_max_rel_diff"] < 1e-4  # ComfyUI's sigmas are the recorded schedule's
        assert result["x0_max_abs_diff"] < 1e-4 * max(1.0, result["x0_scale"]), result
        assert result["model_size"] == result["runner_bytes"] > 0  # the engine's size reaches ComfyUI
        assert result["memory_required"] == 0
        if result["openvino_vs_onnxruntime"] is not None:  # openvino in ComfyUI's environment (README)
            assert result["openvino_vs_onnxruntime"] < 1e-4 * max(1.0, result["x0_scale"]), result


def _train_prompt(name: str, steps: int, resume: bool = False, checkpoint_every: int = 2) -> dict:
    """The shipped training workflow on the tiny SD1.5 model (64 px, fp32 on the CPU), its preview
    branch replaced by a SaveLatent of the student's 4-step sample."""
    prompt = _tiny(json.loads((ROOT / "workflows" / "api" / "sdxl_tdm_train_lora.json").read_text()))
    for node in prompt.values():
        if node["class_type"] == "TDMTrainLoRA":
            node["inputs"].update(prompts="a red cat\na blue dog", width=64, height=64, steps=steps, lora_rank=4,
                                  lora_alpha=8.0, training_dtype="fp32", gradient_checkpointing=True, lora_name=name,
                                  resume=resume, checkpoint_every=checkpoint_every, fake_learning_rate=1e-3,
                                  generator_learning_rate=1e-3)
    prompt = {k: n for k, n in prompt.items() if n["class_type"] != "PreviewImage" or n["inputs"]["images"][0] != "6"}
    return _latent_output(prompt)


def test_train_node_saves_a_native_lora_that_loraloader_loads_completely(comfy):
    """TDM Train LoRA on the tiny model: the LoRA lands in models/loras in ComfyUI's native keys
    with the true alpha, LoraLoader loads every key of it, and the node's own MODEL output is that
    LoRA applied (the same 4-step sample)."""
    from safetensors import safe_open

    url, base, log = comfy
    entry = _run_prompt(url, _train_prompt("tiny_trained", steps=3), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    path = base / "models" / "loras" / "tiny_trained.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_up", "lora_down"}
    assert any(".attn1.to_q." in k for k in keys) and alphas == {8.0}
    assert json.loads(metadata["tdm.timesteps"]) == [899, 674, 449, 224] and metadata["ss_max_train_steps"] == "3"
    assert metadata["tdm.training_cfg"] == "3.5"  # the workflow's training_cfg 0 = auto: SD1.x's recipe
    diffusers_copy = base / "output" / "tdm_training" / "tiny_trained" / "diffusers" / "pytorch_lora_weights.safetensors"
    assert diffusers_copy.is_file()  # for diffusers users (SD1.x / SDXL)
    student = _saved_latent(base, entry)
    assert student.isfinite().all()

    # the saved file through ComfyUI's own LoraLoader: nothing left unloaded, the same sample
    start = len(log.read_text())
    prompt = _train_prompt("tiny_trained", steps=3)
    train_id = next(k for k, n in prompt.items() if n["class_type"] == "TDMTrainLoRA")
    checkpoint_id = prompt[train_id]["inputs"]["model"][0]
    prompt[train_id] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": [checkpoint_id, 0], "lora_name": "tiny_trained.safetensors", "strength_model": 1.0}}
    loaded = _run_prompt(url, prompt)
    assert loaded["status"]["status_str"] == "success", loaded["status"]["messages"]
    assert "lora key not loaded" not in log.read_text()[start:]
    torch.testing.assert_close(_saved_latent(base, loaded), student, atol=1e-4, rtol=1e-4)


def test_interrupted_training_keeps_a_checkpoint_and_resume_continues_from_it(comfy):
    url, base, log = comfy
    folder = base / "output" / "tdm_training" / "tiny_interrupted"
    status, answer = _post(url + "/prompt", {"prompt": _train_prompt("tiny_interrupted", steps=100000,
                                                                     checkpoint_every=100000),
                                             "client_id": str(uuid.uuid4())})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    start = len(log.read_text())
    deadline = time.time() + 300
    while "TDM:" not in log.read_text()[start:] and time.time() < deadline:  # the training progress bar
        time.sleep(0.5)
    time.sleep(5)  # a few training steps
    _post(url + "/interrupt", {})
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    assert history[prompt_id]["status"]["status_str"] != "success"
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "the Cancel button left no checkpoint"
    reached = int(checkpoints[-1].name.split("-")[1])
    carried = json.loads((checkpoints[-1] / "train_history.json").read_text())  # the log up to that step
    assert reached >= 1
    assert not (base / "models" / "loras" / "tiny_interrupted.safetensors").exists()

    # without resume the run is refused rather than overwritten
    refused = _run_prompt(url, _train_prompt("tiny_interrupted", steps=reached + 2))
    message = [m for m in refused["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "already exist" in message and "resume" in message
    start = len(log.read_text())
    resumed = _run_prompt(url, _train_prompt("tiny_interrupted", steps=reached + 2, resume=True), timeout=600)
    assert resumed["status"]["status_str"] == "success", resumed["status"]["messages"]
    assert f"resumed from {checkpoints[-1]} at step {reached}" in log.read_text()[start:]
    history = json.loads((folder / "train_history.json").read_text())
    # the whole run's log, each step once: the checkpoint's own entries carried over, then only the missing steps
    assert [h["step"] for h in history] == list(range(1, reached + 3))
    assert history[:reached] == carried


def _cogvideox_prompt(model: str, lora: str, frames: int = 9) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / "cogvideox_2b_tdm_4step.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "TDMCogVideoXLoader":
            inputs.update(model=model, dtype="fp32")
        elif node["class_type"] == "TDMCogVideoXLoRA":
            inputs["lora_name"] = lora
        elif node["class_type"] == "TDMCogVideoXTextEncode":
            inputs["text"] = "a red cat riding a horse"
        elif node["class_type"] == "TDMCogVideoXSampler":
            inputs.update(frames=frames, width=16, height=16, seed=7)
    sampler_id = next(k for k, n in prompt.items() if n["class_type"] == "TDMCogVideoXSampler")
    prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": "tdm_cog"}}
    return prompt


def test_cogvideox_workflow_samples_the_trained_grid_and_saves_frames(comfy, tmp_path):
    """The shipped CogVideoX workflow on a tiny CogVideoX folder with a LoRA made by our trainer's
    exporter: 4 steps on 999/856/665/399, the same latents as tdm_train.pipelines.cogvideox computes
    outside ComfyUI, 9 decoded frames in an animated WEBP; and the clear errors."""
    import shutil

    from export_helpers import tiny_student
    from PIL import Image

    from tdm_train.pipelines.cogvideox import CogVideoXParts

    url, base, _ = comfy
    pipeline, lora = tiny_student(tmp_path, "cogvideox")
    shutil.copytree(pipeline, base / "models" / "CogVideo" / "tiny_cogvideox")
    shutil.copy(lora / "pytorch_lora_weights.safetensors", base / "models" / "loras" / "tiny_cog_tdm.safetensors")

    entry = _run_prompt(url, _cogvideox_prompt("tiny_cogvideox", "tiny_cog_tdm.safetensors"))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    assert any("strength 1 (metadata tdm.lora_strength), 4 modules, fused" in t for t in texts), texts
    latents = _saved_latent(base, entry)
    assert latents.shape == (1, 4, 3, 2, 2)  # [B, C, F, h, w]: 9 frames -> 3 latent frames, 16 px -> 2
    parts = CogVideoXParts.load(pipeline, "fp32").with_lora(lora / "pytorch_lora_weights.safetensors")
    expected = parts.sample(parts.encode(["a red cat riding a horse"]), seed=7, frames=9, height=16, width=16)
    torch.testing.assert_close(latents, expected.permute(0, 2, 1, 3, 4), atol=1e-4, rtol=1e-4)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    with Image.open(base / "output" / images[0]["subfolder"] / images[0]["filename"]) as webp:
        assert webp.size == (16, 16) and webp.n_frames == 9

    bad_frames = _run_prompt(url, _cogvideox_prompt("tiny_cogvideox", "tiny_cog_tdm.safetensors", frames=10))
    message = [m for m in bad_frames["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "4k+1" in message
    shutil.copytree(tiny_student(tmp_path / "sdxl", "sdxl")[0], base / "models" / "CogVideo" / "not_cogvideox")
    not_cog = _run_prompt(url, _cogvideox_prompt("not_cogvideox", "tiny_cog_tdm.safetensors"))
    message = [m for m in not_cog["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "is not a CogVideoX diffusers folder" in message and "StableDiffusionXLPipeline" in message


def test_train_node_distils_a_comfyui_sd35_model_on_its_flow_grid(tmp_path):
    """Runs in ComfyUI's Python (no server): TDM Train LoRA on ComfyUI's own SD3 MODEL of a
    reduced-depth SD3.5-shaped transformer (dual attention, qk RMS norm; ComfyUI's detection reads
    depth 2 from hidden 128), with a stand-in CLIP (ComfyUI builds SD3's encoders at full size
    only). The grid starts at pure noise (999/749/499/249 = sigmas 1, 0.9, 0.75, 0.5), the guidance is
    SD3.5's default, every attention projection (SD3.5's attn2 too) is trained and loads back through
    ComfyUI's key map, and the returned MODEL samples as the saved file through the TDM LoRA Loader."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=128, pooled_projection_dim=24, out_channels=16,
                                        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    for p in transformer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(tmp_path / "tiny_sd35.safetensors"))
    out = _check_in_comfy("check_sd3_training_in_comfy.py", tmp_path, timeout=600)
    assert out["type"] == "SD3" and out["family"] == "sd3.5"
    assert out["timesteps"] == [999, 749, 499, 249] and "timesteps [999, 749, 499, 249]" in out["summary"]
    assert out["training_cfg"] == "4.5" and "sd3.5 default" in out["summary"]
    # 2 blocks x (x_block qkv, proj; context_block qkv, proj but in the last, pre-only block) + block 0's attn2
    assert len(out["modules"]) == 2 * 4 - 1 + 2 and any(".attn2." in m for m in out["modules"])
    assert out["patched"] == len(out["modules"]) and out["not_loaded"] == []
    assert "strength 1 (metadata tdm.lora_strength)" in out["loader_summary"]
    assert out["sigmas"] == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert out["recorded_sigmas"] == {"loader": out["sigmas"], "trainer": out["sigmas"]}  # total_steps 900 ignored
    assert "carries no TDM LoRA grid" in out["recorded_on_base"]
    assert out["finite"] and out["student_vs_base"] > 1e-4 and out["student_vs_loaded"] < 1e-5
