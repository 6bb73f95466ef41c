"""The pack as ComfyUI and pip see it: imports outside ComfyUI, the V3 entry point, packaging
metadata, and the torch rule."""

import asyncio
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_pack_like_comfyui():
    """ComfyUI's load_custom_node: spec_from_file_location on <pack>/__init__.py with the path as
    module name and submodule search locations, so relative imports work."""
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_pack_imports_outside_comfyui_and_exposes_only_the_v3_entry_point():
    pack = _import_pack_like_comfyui()
    assert callable(pack.comfy_entrypoint)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # it would make ComfyUI ignore comfy_entrypoint
    assert str(ROOT) in sys.path
    assert "comfy" not in sys.modules and "comfy_api" not in sys.modules


def test_entry_point_outside_comfyui_fails_with_a_clear_message():
    pack = _import_pack_like_comfyui()
    with pytest.raises(ImportError, match="ComfyUI >= 0.3.48"):
        asyncio.run(pack.comfy_entrypoint())


def test_library_imports_without_comfyui():
    code = "import tdm_train, export, sys; assert not any(m.startswith('comfy') for m in sys.modules); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def _requirements():
    return [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip()]


def test_requirements_never_name_torch_and_equal_pyproject_dependencies():
    requirements = _requirements()
    assert requirements, "requirements.txt lists nothing"
    names = {re.split(r"[<>=!~\[; ]", r)[0].lower() for r in requirements}
    assert not names & {"torch", "torchvision", "torchaudio"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirements


def test_pyproject_registry_block_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    extras = {name: {re.split(r"[<>=!~\[; ]", dep)[0] for dep in deps}
              for name, deps in meta["project"]["optional-dependencies"].items()}
    export_tools = {"onnx", "onnx-graphsurgeon", "polygraphy", "onnxscript"}
    assert {"tensorrt", "onnxruntime-gpu"} | export_tools <= extras["trt"] and "onnxruntime" not in extras["trt"]
    assert {"onnxruntime"} | export_tools <= extras["onnx"]
    assert {"pytest", "onnxruntime"} | export_tools <= extras["dev"]  # the export tests run in CI
    assert not (extras["onnx"] | extras["trt"]) & {"torch", "torchvision", "torchaudio"}
    assert "nodes*" not in meta["tool"]["setuptools"]["packages"]["find"]["include"]


# import names of the distributions whose import name differs
IMPORT_NAMES = {"scikit-learn": "sklearn", "onnx-graphsurgeon": "onnx_graphsurgeon", "pytest-timeout": "pytest_timeout",
                "pillow": "PIL", "pyyaml": "yaml"}


@pytest.mark.parametrize("requirement", _requirements() + tomllib.loads((ROOT / "pyproject.toml").read_text())[
    "project"]["optional-dependencies"]["dev"])
def test_runtime_and_dev_dependencies_are_installed_and_import(requirement):
    """The tests import these plainly (no importorskip): a broken install fails here, by name, rather
    than turning into skips. Only what CI cannot have (TensorRT, CUDA, a ComfyUI checkout) skips."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed: pip install -e .[dev]")
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not satisfy {req}"
    importlib.import_module(IMPORT_NAMES.get(req.name.lower(), req.name.lower().replace("-", "_")))


def _load_install_py():
    spec = importlib.util.spec_from_file_location("tdm_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_py_installs_requirements_into_the_running_python(monkeypatch):
    install = _load_install_py()
    commands = []
    monkeypatch.setattr(install.subprocess, "call", lambda cmd: commands.append(cmd) or 0)
    assert install.main() == 0
    assert commands == [[sys.executable, "-m", "pip", "install", *_requirements()]]


def test_install_py_refuses_a_requirements_file_that_names_torch(tmp_path):
    install = _load_install_py()
    bad = tmp_path / "requirements.txt"
    bad.write_text("safetensors\ntorch>=2.0  # would replace the CUDA build\n")
    with pytest.raises(SystemExit, match="torch"):
        install.requirement_lines(bad)


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()]
    main_job = "bash .ci/setup.sh && .venv/bin/python -m tdm_train"
    tests = "bash .ci/setup.sh && .venv/bin/python -m pytest"
    assert main_job in commands and tests in commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [tests]
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    assert "torch==2.13.0" in setup and "-e \".[dev]\"" in setup
