#!/usr/bin/env bash
# Create .venv and install FlowMesh with its LLM and dev extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this CPU build is what the machines carry; an unpinned torch
# would pull several GB of CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[llm,dev]"
echo "FlowMesh installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
