"""The package boundaries DESIGN.md requires: engine/ and workers/ speak only via topics/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_packages(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_engine_and_workers_never_import_each_other() -> None:
    assert "workers" not in imported_packages("engine")
    assert "engine" not in imported_packages("workers")


def test_topics_depends_on_neither() -> None:
    imports = imported_packages("topics")
    assert "engine" not in imports and "workers" not in imports


def test_required_top_level_layout() -> None:
    for name in [
        "pyproject.toml",
        "topics",
        "engine",
        "workers",
        "loadgen",
        "configs",
        "deploy",
        "tests",
        "README.md",
        ".ci/run",
    ]:
        assert (REPO / name).exists(), name
