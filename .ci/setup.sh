#!/usr/bin/env bash
# Development / CI set-up: .venv with the CPU torch wheel, then the pack editable with [dev].
# torch is installed here explicitly and nowhere else (never in requirements.txt or install.py).
# Set TORCH_INDEX_URL (e.g. PyTorch's CPU wheel index) where torch==2.13.0 is not on local disk.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  index_args=(--index-url "$TORCH_INDEX_URL")
fi
.venv/bin/python -m pip install --quiet "${index_args[@]}" "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
