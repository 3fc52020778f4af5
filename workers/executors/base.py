"""The executor seam: what the worker runtime hands an executor and what it gets back.

The runtime does all I/O (CAS reads and writes, the bus); an executor is a pure function
of its batch, run in a thread so the worker keeps heartbeating while it computes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

Record = dict[str, Any]

# What one operator may produce and how long it may run: tenants' params choose the work
# (a 12 KB join gave 90,000 records, a template `{text:>100000000}` a 100 MB record,
# `train steps: 10**12` ran forever), and a worker is shared by every tenant.
MAX_OUTPUT_RECORDS = 10_000  # records one operator writes
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # one operator's records, as JSON
MAX_FIELD_WIDTH = 10_000  # a width or precision in a template's format spec
OP_WALL_S = float(os.environ.get("FLOWMESH_OP_WALL_S", "900"))  # one operator's run


MAX_CANCELLED_KEPT = 10_000  # cancelled workflow ids a worker remembers
CANCELLED = "its workflow was cancelled"
# operator keys of the running batch whose workflow was cancelled: run_each skips them
# (set from the worker's event loop, read by the executor's thread; set ops are atomic)
_cancelled_keys: set[str] = set()


def cancel_keys(keys: Iterable[str]) -> None:
    _cancelled_keys.update(keys)


def uncancel_keys(keys: Iterable[str]) -> None:
    _cancelled_keys.difference_update(keys)


class Deadline:
    """An operator's wall-time budget, checked by executors that loop (train steps)."""

    def __init__(self, seconds: float = OP_WALL_S) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self, who: str) -> None:
        if time.monotonic() > self.end:
            raise OpError(f"{who}: ran past the {self.seconds:.0f} s limit of one operator")


def check_output(who: str, records: list[Record]) -> list[Record]:
    """An operator's output within MAX_OUTPUT_RECORDS and MAX_OUTPUT_BYTES, or OpError."""
    if len(records) > MAX_OUTPUT_RECORDS:
        raise OpError(
            f"{who}: {len(records)} output records; one operator may write at most "
            f"{MAX_OUTPUT_RECORDS}"
        )
    size = sum(len(msgspec.json.encode(r)) for r in records)
    if size > MAX_OUTPUT_BYTES:
        raise OpError(
            f"{who}: output of {size} bytes; one operator may write at most {MAX_OUTPUT_BYTES}"
        )
    return records


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
    """Apply fn per operator; an OpError it raises, or an output over the limits, is that
    operator's outcome."""
    outcomes: list[Outcome] = []
    for op in batch:
        if op.key in _cancelled_keys:
            outcomes.append(OpError(CANCELLED))
            continue
        try:
            outcomes.append(check_output(op.key[:12], fn(op)))
        except OpError as exc:
            outcomes.append(exc)
    return outcomes


def describe_error(exc: Exception) -> str:
    """What a user's function raised, in words (a missing field named as such)."""
    if isinstance(exc, KeyError):
        return f"record has no field {exc.args[0]!r}" if exc.args else "missing key"
    return f"{type(exc).__name__}: {exc}"
