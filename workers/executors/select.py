"""The `select` executor: choose among scored samples (topics.operators.SelectParams).

The input is every scored sample (typically `generate` with n > 1, then `score`). Samples
are grouped by `group_by` (one group per prompt); groups come out in order of their first
sample in the input, so the output is a function of the input alone. Ties go to the
sample that comes first in the input.

- best_of_n: the best sample of each group.
- top_k: the k best of each group, best first.
- rejection: every sample scoring at least `threshold`, in input order. It needs no
  groups, so records without `group_by` are fine here.
- pairs: per group, a preference pair for DPO: the best sample as `chosen`, the worst as
  `rejected` (groups with one sample, or all scores equal, give no pair). The pair
  record carries every field the two samples share with equal values (the prompt, ids,
  the group key, the reference answer...), then `chosen` / `rejected` (their
  `text_field`) and `chosen_score` / `rejected_score`. The group key is *not* copied
  to "prompt": it is often an id, and training on an id as the prompt would be silently
  wrong. Samples that carry a "prompt" field hand it on as a shared field, which is what
  the DPO train step reads by default (its `prompt_field` names another field if not).
"""

from __future__ import annotations

import math
import sys
from functools import cache
from typing import Any

from flowmesh.topics.codec import canonical
from flowmesh.topics.operators import SelectParams
from flowmesh.workers.executors.base import OpError, OpInput, Outcome, Record, params_as, run_each
from flowmesh.workers.executors.transform import ALL_MAX_BATCH, source_hash

Scored = tuple[float, Record]


@cache
def _version() -> str:
    return f"1+{source_hash(sys.modules[__name__])}"


class SelectExecutor:
    id = "select"
    kind = "select"
    max_batch = ALL_MAX_BATCH

    @property
    def version(self) -> str:
        return _version()

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._one)

    def _one(self, op: OpInput) -> list[Record]:
        p: SelectParams = params_as(self.id, SelectParams, op.params)
        if len(op.inputs) != 1:
            raise OpError(f"select needs 1 input, got {len(op.inputs)}")
        scored = [(_score(p, rec), rec) for rec in op.inputs[0]]
        if p.method == "rejection":
            return [rec for s, rec in scored if s >= p.threshold]
        if p.method == "top_k" and p.k < 1:
            raise OpError(f"select top_k: k must be >= 1, got {p.k}")
        out: list[Record] = []
        for value, samples in _groups(p, scored):
            # sorted() is stable: among equal scores the earlier sample ranks first
            ranked = sorted(samples, key=lambda s: -s[0])
            if p.method == "best_of_n":
                out.append(ranked[0][1])
            elif p.method == "top_k":
                out.extend(rec for _, rec in ranked[: p.k])
            elif ranked[0][0] > ranked[-1][0]:  # pairs; equal scores say nothing
                worst = min(samples, key=lambda s: s[0])  # min(): the earliest of the worst
                out.append(_pair(p, value, ranked[0], worst))
        return out


def _score(p: SelectParams, record: Record) -> float:
    value = record.get(p.score_field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        got = "missing" if p.score_field not in record else repr(value)
        raise OpError(f"select: score field {p.score_field!r} is {got}, expected a number")
    return float(value)


def _groups(p: SelectParams, scored: list[Scored]) -> list[tuple[Any, list[Scored]]]:
    """Samples grouped by `group_by`, groups in order of first appearance. Keys compare
    as JSON values (canonical bytes): dicts and lists group too, and 1 is not "1"."""
    groups: dict[bytes, tuple[Any, list[Scored]]] = {}
    for s, rec in scored:
        if p.group_by not in rec:
            raise OpError(f"select {p.method}: a record has no group field {p.group_by!r}")
        value = rec[p.group_by]
        groups.setdefault(canonical(value), (value, []))[1].append((s, rec))
    return list(groups.values())


def _pair(p: SelectParams, value: Any, best: Scored, worst: Scored) -> Record:
    (best_score, chosen), (worst_score, rejected) = best, worst
    for rec in (chosen, rejected):
        if not isinstance(rec.get(p.text_field), str):
            raise OpError(f"select pairs: a sample's {p.text_field!r} is not text")
    own = (p.text_field, p.score_field)
    shared = {
        k: v
        for k, v in chosen.items()
        if k not in own and k in rejected and canonical(rejected[k]) == canonical(v)
    }
    return {
        **shared,
        p.group_by: value,
        "chosen": chosen[p.text_field],
        "rejected": rejected[p.text_field],
        "chosen_score": best_score,
        "rejected_score": worst_score,
    }
