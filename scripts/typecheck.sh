#!/usr/bin/env bash
# mypy (strict) over the packages under their installed names. The folders install as
# flowmesh.* through a package-dir mapping that mypy cannot follow in an editable install,
# so it reads them through a link tree, build/ns/flowmesh/<folder> -> <folder>.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/ns/flowmesh
for d in topics engine workers loadgen configs; do
  ln -sfn "../../../$d" "build/ns/flowmesh/$d"
done
exec .venv/bin/mypy "$@"
