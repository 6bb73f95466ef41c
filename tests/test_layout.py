"""The layout of ARCHITECTURE.md holds: one dependency direction, no two modules importing each
other, the top-level names of tdm_train (lazy ones included) resolve, and importing the method
loads none of the heavy libraries."""

import ast
import subprocess
import sys
from pathlib import Path

import tdm_train

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tdm_train", "export", "nodes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (relative imports resolved)."""
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    names = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in names and t != name and not name.startswith(t + ".")}
    return graph


def test_no_two_modules_import_each_other():
    graph = _imports()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert pairs == []


def test_dependencies_point_one_way():
    graph = _imports()
    backwards = [(a, b) for a, deps in graph.items() for b in deps
                 if (a.startswith("tdm_train") and b.split(".")[0] in ("export", "nodes"))
                 or (a.startswith("export") and b.startswith("nodes"))]
    assert backwards == []
    # a backend sees the method, never the training loop; the method never sees a backend
    assert not [(a, b) for a, deps in graph.items() for b in deps
                if a.startswith("tdm_train.backends") and b.startswith("tdm_train.training")]
    method = ("tdm_train.schedule", "tdm_train.timesteps", "tdm_train.sampler", "tdm_train.objectives",
              "tdm_train.distill")
    assert not [(a, b) for a in method for b in graph[a] if b.startswith(("tdm_train.backends", "tdm_train.training"))]


def test_every_public_name_resolves():
    missing = [name for name in tdm_train.__all__ if not hasattr(tdm_train, name)]
    assert missing == []


def test_importing_the_method_stays_light():
    code = ("import sys, tdm_train; heavy = [m for m in ('diffusers', 'peft', 'accelerate', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
