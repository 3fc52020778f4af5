"""The package boundaries: engine/ and workers/ speak only via topics/ (the contract),
and the folders install as one `flowmesh.*` namespace."""

from __future__ import annotations

import ast
import tomllib
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
                parts = name.split(".")
                # flowmesh.engine.x counts as "engine"; a bare top-level name as itself
                top = parts[1] if parts[0] == "flowmesh" and len(parts) > 1 else parts[0]
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
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


PACKAGE_ROOTS = ["topics", "engine", "workers", "loadgen", "configs"]
# the folder that installs as `flowmesh` itself (flowmesh.Client, the public names)
TOP_PACKAGE = "sdk"


def test_every_folder_is_listed_as_a_flowmesh_package() -> None:
    """Setuptools ignores package-dir mappings when it discovers packages, so a new
    sub-package that is not listed in pyproject.toml would be left out of the wheel."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {
        "flowmesh": TOP_PACKAGE,
        **{f"flowmesh.{r}": r for r in PACKAGE_ROOTS},
    }
    # every folder: a Python package, or a folder of data the wheel ships (configs,
    # the console's static files), which setuptools wants listed as well
    on_disk = {
        "flowmesh." + ".".join(folder.relative_to(REPO).parts)
        for root in PACKAGE_ROOTS
        for folder in [REPO / root, *(REPO / root).rglob("*")]
        if folder.is_dir() and "__pycache__" not in folder.parts
    }
    # the top package is one flat folder: a sub-folder of it would not be listed
    assert [
        p for p in (REPO / TOP_PACKAGE).iterdir() if p.is_dir() and p.name != "__pycache__"
    ] == []
    assert set(tool["packages"]) == on_disk | {"flowmesh"}


def test_no_bare_top_level_imports() -> None:
    """Everything imports through the namespace: a bare `import engine` works in the
    checkout and fails in an installed wheel."""
    bare = []
    for root in [*PACKAGE_ROOTS, TOP_PACKAGE, "tests"]:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                bare += [
                    f"{path.relative_to(REPO)}: {n}"
                    for n in names
                    if n.split(".")[0] in [*PACKAGE_ROOTS, TOP_PACKAGE]
                ]
    assert bare == []
