"""The executor seam: what the worker runtime hands an executor and what it gets back.

The runtime does all I/O (CAS reads and writes, the bus); an executor is a pure function
of its batch, run in a thread so the worker keeps heartbeating while it computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

Record = dict[str, Any]


@dataclass(frozen=True)
class OpInput:
    """One operator of a batch, with its inputs already fetched from the CAS.

    inputs[i] is the list of records of input slot i: for a record-fanout operator one
    slot holding one record; for an all-fanout operator (join, group) one slot per
    input node holding all its records, in order."""

    key: str
    params: dict[str, Any]
    inputs: list[list[Record]]


class OpError(Exception):
    """An operator failed on its own input (bad record, bad args). Only that operator
    fails; the rest of its batch still commits."""


# Per operator of the batch, in order: its output records, or the error it raised.
Outcome = list[Record] | OpError


class Executor(Protocol):
    @property
    def id(self) -> str:
        """Executor id as topics.operators.executor_id(kind, fn) spells it."""
        ...

    @property
    def kind(self) -> str: ...

    @property
    def version(self) -> str:
        """Implementation version; part of every operator key this executor serves."""
        ...

    @property
    def max_batch(self) -> int: ...

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        """Run a batch of compatible operators (same executor, params, model).
        `model` is the loaded model for operators whose kind needs one, else None."""
        ...


# --- helpers every executor uses ------------------------------------------------------


def one_record(op: OpInput) -> Record:
    """The one input record of a record-fanout operator, or an OpError saying why not."""
    if len(op.inputs) != 1 or len(op.inputs[0]) != 1:
        shape = [len(slot) for slot in op.inputs]
        raise OpError(f"expected one input record, got input slots of sizes {shape}")
    record = op.inputs[0][0]
    if not isinstance(record, dict):
        raise OpError(f"input is {type(record).__name__}, expected a record (object)")
    return record


def params_as(executor_id: str, typ: type[Any], raw: dict[str, Any]) -> Any:
    """An operator's params as `typ`; bad ones are that operator's OpError."""
    try:
        return msgspec.convert(raw, type=typ)
    except msgspec.ValidationError as exc:
        raise OpError(f"{executor_id}: bad params: {exc}") from exc


def run_each(batch: list[OpInput], fn: Callable[[OpInput], list[Record]]) -> list[Outcome]:
    """Apply fn per operator; an OpError it raises is that operator's outcome."""
    outcomes: list[Outcome] = []
    for op in batch:
        try:
            outcomes.append(fn(op))
        except OpError as exc:
            outcomes.append(exc)
    return outcomes


def describe_error(exc: Exception) -> str:
    """What a user's function raised, in words (a missing field named as such)."""
    if isinstance(exc, KeyError):
        return f"record has no field {exc.args[0]!r}" if exc.args else "missing key"
    return f"{type(exc).__name__}: {exc}"
