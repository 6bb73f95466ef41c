"""benchmarks/gpu_check.py is written for a machine with an NVIDIA GPU and TensorRT; here (no CUDA)
it must stop at once with exit 5 and say what is missing, before building anything."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_the_check_names_what_is_missing_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA device is here: run benchmarks/gpu_check.sh itself")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT),
                                                                                       "PATH": "/usr/bin:/bin"})
    assert done.returncode == 5, done.stderr
    assert "sees no CUDA device" in done.stderr and "NVIDIA GPU" in done.stderr
    assert not (tmp_path / "out").exists()
