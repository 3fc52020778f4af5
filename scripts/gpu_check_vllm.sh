#!/usr/bin/env bash
# One-shot check of the vLLM `generate` backend against the HF one on a lent GPU machine.
# Nothing is assumed of that machine: it prints what it has, installs the carried
# wheels of FlowMesh's small pure dependencies if there are any, tries (briefly) to
# pip install vllm if it is missing, then runs scripts/gpu_check_vllm.py under a hard
# timeout. Every step is bounded; the whole run stays under 5 minutes and exits 0 with
# its findings in $OUT/vllm_check.json (or /tmp/flowmesh-gpu-check/) whatever fails.
#
#   bash scripts/gpu_check_vllm.sh --fetch-wheels   # here (registry access): download the
#                                                   # cp312 wheels the GPU image lacks into
#                                                   # build/gpu-wheels (git-ignored)
#   bash scripts/gpu_check_vllm.sh                  # there, with build/gpu-wheels carried
#
# Env: PYTHON (default: .venv/bin/python if present, else python3), VLLM_PIP_TIMEOUT
# (seconds for the pip install vllm attempt, default 60; 0 skips it), CHECK_BUDGET (default
# 270: seconds for everything).
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
WHEELS=${GPU_WHEELS:-build/gpu-wheels}
# FlowMesh's imports that the GPU image ('cuda', Python 3.12) does not have; versions as
# in the dev venv. pyarrow, numpy, rich, pyyaml, torch, transformers are there already.
PINS="msgspec==0.22.0 nats-py==2.16.0 structlog==26.1.0 zstandard==0.25.0"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  PIP=${PYTHON:-python3}
  [ -x .venv/bin/python ] && PIP=.venv/bin/python
  # shellcheck disable=SC2086
  exec "$PIP" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" $PINS
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== nvidia-smi"
timeout 20 nvidia-smi || echo "(nvidia-smi not available or failed: $?)"
echo "== python: $PY"
timeout 10 "$PY" -c 'import sys; print(sys.version); print(sys.executable)' || echo "(python failed)"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "== installing carried wheels from $WHEELS into /tmp/fm-site"
  # one at a time: a wheel that does not fit this Python fails alone
  for whl in "$WHEELS"/*.whl; do
    timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/fm-site "$whl" || echo "(could not install $whl)"
  done
  export PYTHONPATH="/tmp/fm-site${PYTHONPATH:+:$PYTHONPATH}"
fi

IMPORTS=$(cat <<'PYEOF'
import importlib, time
for name in ("torch", "transformers", "tokenizers", "msgspec", "nats", "structlog", "zstandard", "vllm"):
    t = time.time()
    try:
        m = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" cuda={m.version.cuda} available={m.cuda.is_available()}"
            if m.cuda.is_available():
                extra += f" device={m.cuda.get_device_name(0)}"
        version = getattr(m, "__version__", "?")
        print(f"{name}: {version}{extra} ({time.time() - t:.1f} s)")
    except Exception as exc:
        print(f"{name}: NOT importable: {type(exc).__name__}: {exc}")
PYEOF
)
echo "== imports"
timeout 90 "$PY" -c "$IMPORTS" >/tmp/fm-imports.txt 2>&1 || echo "(import check failed: $?)"
cat /tmp/fm-imports.txt

if [ "${VLLM_PIP_TIMEOUT:-60}" = 0 ]; then
  echo "== vllm: no pip install attempt (VLLM_PIP_TIMEOUT=0)"
elif ! grep -q '^vllm: [0-9]' /tmp/fm-imports.txt; then
  echo "== vllm not importable: trying pip install vllm (timeout ${VLLM_PIP_TIMEOUT:-60} s)"
  if timeout "${VLLM_PIP_TIMEOUT:-60}" "$PY" -m pip install -q --retries 0 --timeout 10 \
      --target /tmp/fm-vllm vllm >/tmp/fm-vllm-pip.log 2>&1; then
    export PYTHONPATH="/tmp/fm-vllm${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install vllm: done"
  else
    echo "pip install vllm: failed ($?); last lines:"
    grep -v '^WARNING' /tmp/fm-vllm-pip.log | tail -n 5
  fi
fi

# what is left of the 5 minutes, less a margin for the JSON and the exit
LEFT=$(( ${CHECK_BUDGET:-270} - (SECONDS - START) ))
[ "$LEFT" -lt 30 ] && LEFT=30
echo "== gpu_check_vllm.py (budget ${LEFT} s)"
timeout -k 10 $(( LEFT + 15 )) "$PY" scripts/gpu_check_vllm.py --budget "$LEFT" \
  || echo "(gpu_check_vllm.py failed or timed out: $?)"
echo "== done in $(( SECONDS - START )) s"
exit 0
