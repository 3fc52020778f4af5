"""The default configs that ship inside the package: fleet profiles, scheduler weights,
example workflows and small example data. Read them with `flowmesh.configs.path(...)`,
which works from a checkout, an editable install and a wheel alike."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

__all__ = ["path"]


def path(*parts: str) -> Path:
    """The file `configs/<parts...>` as a filesystem path.

    Wheels install as plain directories, so `as_file` returns the file in place; the
    context is left at once (no temporary copy is ever made for a directory install)."""
    resource = files(__name__).joinpath(*parts)
    with as_file(resource) as p:
        return Path(p)
