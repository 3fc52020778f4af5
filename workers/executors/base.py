"""The executor seam: what the worker runtime hands an executor and what it gets back.

The runtime does all I/O (CAS reads and writes, the bus); an executor is a pure function
of its batch, run in a thread so the worker keeps heartbeating while it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

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
