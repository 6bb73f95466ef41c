#!/usr/bin/env bash
# The one-command GPU check (benchmarks/gpu_check.py): installs the pack with its `trt` extra
# (TensorRT, onnxruntime-gpu, polygraphy, ...) into the current Python unless TensorRT is already
# importable, then runs the check. Needs an NVIDIA GPU, a CUDA build of torch, and a package index
# (or PIP_FIND_LINKS pointing at wheels). Output: the table on stdout and in ${OUT:-gpu_check}/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import tensorrt" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet -e ".[trt]"
fi
PYTHONPATH=. PYTHONUNBUFFERED=1 exec "$PYTHON" benchmarks/gpu_check.py --out "${OUT:-gpu_check}" "$@"
