"""Executors: the code that runs operators. See base.py for the interface."""

from __future__ import annotations

from collections.abc import Sequence

from flowmesh.workers.executors.base import Executor, OpError, OpInput, Outcome, Record
from flowmesh.workers.executors.embed import EmbedExecutor
from flowmesh.workers.executors.evaluate import EvalExecutor
from flowmesh.workers.executors.generate import GenerateExecutor
from flowmesh.workers.executors.score import ScoreExecutor
from flowmesh.workers.executors.select import SelectExecutor
from flowmesh.workers.executors.tool import ToolExecutor, registered_tools
from flowmesh.workers.executors.train import TrainExecutor
from flowmesh.workers.executors.transform import (
    FilterExecutor,
    GroupExecutor,
    JoinExecutor,
    MapExecutor,
    TokenizeExecutor,
    load_plugins,
    registered,
)
from flowmesh.workers.executors.vllm_backend import Backend, make_generate_executor

# The @transform decorator is not re-exported: `workers.executors.transform` must stay the
# submodule (plugins write `from workers.executors.transform import transform`).


def builtin_executors(
    plugins: Sequence[str] = (), generate_backend: Backend = "auto"
) -> dict[str, Executor]:
    """Every executor this worker can run, keyed by id: one per registered map/filter
    transform (built-ins plus those the `plugins` modules register), tokenize, join,
    group, generate, embed and train. Importing this does not import torch;
    generating does."""
    load_plugins(plugins)
    executors: list[Executor] = [TokenizeExecutor(), JoinExecutor(), GroupExecutor()]
    # generate: vLLM where a GPU and vllm are there, else transformers (their versions
    # differ, so their operator keys do too)
    executors += [make_generate_executor(generate_backend), EmbedExecutor(), TrainExecutor()]
    for name, t in sorted(registered().items()):
        executors.append(MapExecutor(name) if t.kind == "map" else FilterExecutor(name))
    # score / select / eval, and one tool executor per @tool (the same plugin modules
    # register transforms and tools alike: load_plugins above imported both)
    executors += [ScoreExecutor(), SelectExecutor(), EvalExecutor()]
    executors += [ToolExecutor(name) for name in sorted(registered_tools())]
    return {e.id: e for e in executors}


__all__ = [
    "EmbedExecutor",
    "EvalExecutor",
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
    "ScoreExecutor",
    "SelectExecutor",
    "TokenizeExecutor",
    "ToolExecutor",
    "TrainExecutor",
    "builtin_executors",
    "load_plugins",
]
