#!/usr/bin/env bash
# mypy (strict) over the packages under their installed names. The folders install as
# flowmesh.* through a package-dir mapping that mypy cannot follow in an editable install,
# so it reads them through a link tree, build/ns/flowmesh/<folder> -> <folder>, with the
# top-level package's own modules (sdk/*.py) linked beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/ns/flowmesh
for d in topics engine workers loadgen configs; do
  ln -sfn "../../../$d" "build/ns/flowmesh/$d"
done
for f in sdk/*.py; do
  ln -sfn "../../../$f" "build/ns/flowmesh/$(basename "$f")"
done
exec .venv/bin/mypy "$@"
