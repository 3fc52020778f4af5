"""The executor seam: what the worker runtime hands an executor and what it gets back.

The runtime does all I/O (CAS reads and writes, the bus); an executor is a pure function
of its batch, run in a thread so the worker keeps heartbeating while it computes.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from flowmesh.topics.messages import OP_CANCELLED

Record = dict[str, Any]

# What one operator may produce and how long it may run: tenants' params choose the work
# (a 12 KB join gave 90,000 records, a template `{text:>100000000}` a 100 MB record,
# `train steps: 10**12` ran forever), and a worker is shared by every tenant.
MAX_OUTPUT_RECORDS = 10_000  # records one operator writes
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # one operator's records, as JSON
MAX_FIELD_WIDTH = 10_000  # a width or precision in a template's format spec
OP_WALL_S = float(os.environ.get("FLOWMESH_OP_WALL_S", "900"))  # one operator's run


MAX_CANCELLED_KEPT = 10_000  # cancelled workflow ids a worker remembers
CANCELLED = OP_CANCELLED
# operator keys of the running batch whose workflow was cancelled: run_each skips them
# (set from the worker's event loop, read by the executor's thread; set ops are atomic)
_cancelled_keys: set[str] = set()


def cancel_keys(keys: Iterable[str]) -> None:
    _cancelled_keys.update(keys)


def uncancel_keys(keys: Iterable[str]) -> None:
    _cancelled_keys.difference_update(keys)


def wall_limit_error(seconds: float, who: str = "") -> OpError:
    """The failure of an operator that ran past its wall-time limit (permanent: it would
    take as long again)."""
    lead = f"{who}: " if who else ""
    return OpError(
        f"{lead}ran past the {seconds:g} s wall-time limit of one operator ($FLOWMESH_OP_WALL_S)",
        permanent=True,
    )


class Deadline:
    """An operator's wall-time budget, checked by executors that loop (train steps)."""

    def __init__(self, seconds: float = OP_WALL_S) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self, who: str) -> None:
        if time.monotonic() > self.end:
            raise wall_limit_error(self.seconds, who)


class LimitExceeded(ValueError):
    """Raised by built-in code (a template's width) when a tenant's params ask for more
    than a limit allows: the operator fails at once, without retries."""


class OpTimeout(BaseException):
    """Raised inside an executor's thread by the worker's watch once the operator in hand
    is past its wall-time limit. A BaseException, so that user code's `except Exception`
    does not swallow it."""


class Watch:
    """The clock of one executor thread. run_each starts a lap per operator; an executor
    that runs its batch as one (generate, embed, score, train) is one lap. The worker's
    event loop reads it and, past the limit, raises OpTimeout in that thread (at its next
    Python instruction: a call blocked in C code is abandoned instead, see
    workers/runtime.py)."""

    def __init__(self, limit_s: float = OP_WALL_S) -> None:
        self.limit_s = limit_s
        self.thread_id = 0
        self.key = ""  # the operator of this lap ("" while the whole batch is one)
        self.started = time.monotonic()
        self.running = True
        self.interrupted = ""  # the key whose lap was interrupted
        self._interrupted_lap = -1.0  # that lap's start: each lap is interrupted once
        self._lock = threading.Lock()

    def lap(self, key: str) -> None:
        with self._lock:
            self.key, self.started, self.running = key, time.monotonic(), True

    def lap_end(self) -> None:
        with self._lock:
            self.running = False

    def overdue(self, now: float | None = None) -> float:
        """Seconds past the limit of the lap in hand (<= 0: within it, or none running)."""
        if not self.running:
            return 0.0
        return (now or time.monotonic()) - self.started - self.limit_s

    def interrupt(self) -> bool:
        """Raise OpTimeout in the executor's thread if its lap is still overdue (once a
        lap: a second one could land in the first one's clean-up)."""
        with self._lock:
            if not self.thread_id or self.overdue() <= 0 or self._interrupted_lap == self.started:
                return False
            self.interrupted, self._interrupted_lap = self.key, self.started
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread_id), ctypes.py_object(OpTimeout)
            )
            return True


_local = threading.local()


def current_watch() -> Watch | None:
    """The watch of the executor thread this is called in (None outside a worker)."""
    watch: Watch | None = getattr(_local, "watch", None)
    return watch


def watched(watch: Watch, fn: Callable[[], Any]) -> Any:
    """Run fn in this thread under `watch` (the worker's executor thread calls this)."""
    watch.thread_id = threading.get_ident()
    _local.watch = watch
    try:
        return fn()
    finally:
        watch.lap_end()
        _local.watch = None


def check_output(who: str, records: list[Record]) -> list[Record]:
    """An operator's output within MAX_OUTPUT_RECORDS and MAX_OUTPUT_BYTES, or a
    permanent OpError (the same input and params give the same output)."""
    if len(records) > MAX_OUTPUT_RECORDS:
        raise OpError(
            f"{who}: {len(records)} output records; one operator may write at most "
            f"{MAX_OUTPUT_RECORDS}",
            permanent=True,
        )
    size = sum(len(msgspec.json.encode(r)) for r in records)
    if size > MAX_OUTPUT_BYTES:
        raise OpError(
            f"{who}: output of {size} bytes; one operator may write at most {MAX_OUTPUT_BYTES}",
            permanent=True,
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
    fails; the rest of its batch still commits. A failure that would only repeat (a
    limit, bad params) is `permanent`: it fails the operator at once; others are retried
    up to the operator's max_attempts (a user function may fail on something passing)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


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
        raise OpError(f"{executor_id}: bad params: {exc}", permanent=True) from exc


def run_each(batch: list[OpInput], fn: Callable[[OpInput], list[Record]]) -> list[Outcome]:
    """Apply fn per operator; an OpError it raises, or an output over the limits, is that
    operator's outcome. Each operator has its own wall-time lap on the thread's watch."""
    watch = current_watch()
    outcomes: list[Outcome] = []
    for op in batch:
        if op.key in _cancelled_keys:
            outcomes.append(OpError(CANCELLED))
            continue
        try:
            if watch is not None:
                watch.lap(op.key)
            out = fn(op)
            if watch is not None:
                watch.lap_end()
            outcomes.append(check_output(op.key[:12], out))
        except OpError as exc:
            outcomes.append(exc)
        except OpTimeout:
            assert watch is not None  # only a watch raises it
            watch.lap_end()
            if watch.interrupted == op.key:
                outcomes.append(wall_limit_error(watch.limit_s, op.key[:12]))
            else:
                # meant for the operator before, delivered as this one started: not
                # this one's fault, so an ordinary (retried) failure
                outcomes.append(OpError("interrupted by the wall-time limit of another"))
    return outcomes


def describe_error(exc: Exception) -> str:
    """What a user's function raised, in words (a missing field named as such)."""
    if isinstance(exc, KeyError):
        return f"record has no field {exc.args[0]!r}" if exc.args else "missing key"
    return f"{type(exc).__name__}: {exc}"
