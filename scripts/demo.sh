#!/usr/bin/env bash
# Set up (if needed) and run the demo workflow on the embedded defaults: a private
# nats-server, the engine and two workers on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo
exec .venv/bin/flowmesh demo "$@"
