"""The `eval` executor: one metric over a whole dataset (topics.operators.EvalParams).

accuracy: the fraction of records whose `field` matches `reference_field` (exact or
contains, normalised like the score rules: a record counts here exactly when `score`
with the matching rule gives it 1). mean: the mean of a numeric `field`.
Output: one record {"metric", "value", "n"} (+ "correct" for accuracy). An empty input is
a result, not an error: value null, n 0.
"""

from __future__ import annotations

import hashlib
import math
import sys
from functools import cache
from typing import Any

from flowmesh.topics.operators import EvalParams
from flowmesh.workers.executors.base import OpError, OpInput, Outcome, Record, params_as, run_each
from flowmesh.workers.executors.score import as_text, normalise, text_matches
from flowmesh.workers.executors.transform import ALL_MAX_BATCH, source_hash


@cache
def _version() -> str:
    # the match rules live in score.py: their code is part of what this computes
    parts = [source_hash(sys.modules[__name__]), source_hash(text_matches)]
    parts += [source_hash(normalise), source_hash(as_text)]
    return "1+" + hashlib.sha256("".join(parts).encode()).hexdigest()[:12]


class EvalExecutor:
    id = "eval"
    kind = "eval"
    max_batch = ALL_MAX_BATCH

    @property
    def version(self) -> str:
        return _version()

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._one)

    def _one(self, op: OpInput) -> list[Record]:
        p: EvalParams = params_as(self.id, EvalParams, op.params)
        if len(op.inputs) != 1:
            raise OpError(f"eval needs 1 input, got {len(op.inputs)}")
        records = op.inputs[0]
        n = len(records)
        if p.metric == "accuracy":
            who = f"eval accuracy ({p.match})"
            correct = sum(
                text_matches(as_text(r, p.field, who), as_text(r, p.reference_field, who), p.match)
                for r in records
            )
            return [
                {
                    "metric": "accuracy",
                    "value": correct / n if n else None,
                    "n": n,
                    "correct": correct,
                }
            ]
        values = [_number(r, p.field) for r in records]
        return [{"metric": "mean", "value": math.fsum(values) / n if n else None, "n": n}]


def _number(record: Record, field: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        got = "missing" if field not in record else repr(value)
        raise OpError(f"eval mean: field {field!r} is {got}, expected a number")
    return float(value)
