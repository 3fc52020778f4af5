"""Executors: the code that runs operators. See base.py for the interface."""

from __future__ import annotations

from collections.abc import Sequence

from workers.executors.base import Executor, OpError, OpInput, Outcome, Record
from workers.executors.generate import GenerateExecutor
from workers.executors.transform import (
    FilterExecutor,
    GroupExecutor,
    JoinExecutor,
    MapExecutor,
    TokenizeExecutor,
    load_plugins,
    registered,
)

# The @transform decorator is not re-exported: `workers.executors.transform` must stay the
# submodule (plugins write `from workers.executors.transform import transform`).


def builtin_executors(plugins: Sequence[str] = ()) -> dict[str, Executor]:
    """Every executor this worker can run, keyed by id: one per registered map/filter
    transform (built-ins plus those the `plugins` modules register), tokenize, join,
    group and generate. Importing this does not import torch; generating does."""
    load_plugins(plugins)
    executors: list[Executor] = [TokenizeExecutor(), JoinExecutor(), GroupExecutor()]
    executors.append(GenerateExecutor())
    for name, t in sorted(registered().items()):
        executors.append(MapExecutor(name) if t.kind == "map" else FilterExecutor(name))
    return {e.id: e for e in executors}


__all__ = [
    "Executor",
    "FilterExecutor",
    "GenerateExecutor",
    "GroupExecutor",
    "JoinExecutor",
    "MapExecutor",
    "OpError",
    "OpInput",
    "Outcome",
    "Record",
    "TokenizeExecutor",
    "builtin_executors",
    "load_plugins",
]
