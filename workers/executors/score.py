"""The `score` executor: a reward per record, by rule or by an LLM judge.

Rules (topics.operators.ScoreParams): exact_match and contains compare a text field with
a reference after normalising both (strip + casefold); regex scores 1 when the pattern
occurs anywhere; length peaks at target_len words and falls off linearly to 0 at 0 and at
twice the target; judge asks the node's model to rate the record and scales its first
number from 0..10 to 0..1. Every score is a float in [0, 1].

The judge generates through GenerateExecutor itself, so a judge's reply is exactly what a
`generate` node with the same prompt and max_new_tokens would write (greedy, batched,
batch-independent), and the decoding code is maintained in one place.
"""

from __future__ import annotations

import hashlib
import re
import sys
from functools import cache, lru_cache
from typing import Any

import re2

from flowmesh.topics.operators import ScoreParams
from flowmesh.workers.executors.base import OpError, OpInput, Outcome, Record, one_record, params_as
from flowmesh.workers.executors.generate import GenerateExecutor
from flowmesh.workers.executors.transform import source_hash, text_template

# Rules take microseconds, but a judge batch holds its records while it generates (16 at
# a time, generate's own bound): 64 keeps one judge batch to a few generate passes.
SCORE_MAX_BATCH = 64

_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")
# A tenant's pattern runs in RE2: time linear in the text, whatever the pattern ("(a+)+$"
# backtracked in Python's re for longer each extra "a", holding the GIL, so the worker
# stopped heartbeating), and memory bounded by max_mem. Backreferences and lookaround,
# which only a backtracking engine can run, are refused with the reason.
REGEX_MAX_MEM = 8 << 20
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # bad patterns are the tenant's error, not our log's
_RE2_OPTIONS.max_mem = REGEX_MAX_MEM


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """A tenant's regex compiled by RE2, or OpError saying why it cannot be."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        detail = (
            exc.args[0].decode(errors="replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        raise OpError(
            f"score regex: bad pattern {pattern!r}: {detail} (patterns run in RE2: no "
            "backreferences or lookaround)"
        ) from exc


_JUDGE_PROMPT = "prompt"  # field names of the synthetic records handed to generate
_JUDGE_REPLY = "reply"


def normalise(text: str) -> str:
    """What exact_match / contains compare: surrounding whitespace and case don't count."""
    return text.strip().casefold()


def as_text(record: Record, field: str, who: str) -> str:
    """A field as text for matching. Numbers count (a reference answer of 42 matches the
    completion "42"); null, booleans, lists and objects are refused: comparing their str()
    forms would quietly score "None" or "[1, 2]" as text."""
    if field not in record:
        raise OpError(f"{who}: record has no field {field!r}")
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise OpError(f"{who}: field {field!r} is {type(value).__name__}, expected text")


def text_matches(text: str, reference: str, how: str) -> bool:
    """exact: equal after normalising; contains: the reference occurs in the text."""
    t, r = normalise(text), normalise(reference)
    return t == r if how == "exact" else r in t


def length_score(text: str, target: int) -> float:
    """1 at `target` words, linearly down to 0 at 0 words and at 2*target (and beyond)."""
    n = len(text.split())
    return max(0.0, 1.0 - abs(n - target) / target)


def judge_score(reply: str) -> float | None:
    """The first number in the judge's reply, clamped to 0..10, scaled to 0..1; None when
    the reply has no number."""
    m = _NUMBER_RE.search(reply)
    if m is None:
        return None
    return min(max(float(m.group()), 0.0), 10.0) / 10.0


def rule_score(p: ScoreParams, record: Record) -> float:
    """Score one record by a non-judge rule."""
    who = f"score {p.rule}"
    text = as_text(record, p.field, who)
    if p.rule in ("exact_match", "contains"):
        reference = as_text(record, p.reference_field, who)
        return float(
            text_matches(text, reference, "exact" if p.rule == "exact_match" else "contains")
        )
    if p.rule == "regex":
        if p.pattern is None:
            raise OpError("score regex: needs `pattern`")
        return float(compile_pattern(p.pattern).search(text) is not None)
    if p.rule == "length":
        if p.target_len is None or p.target_len < 1:
            raise OpError(f"score length: needs target_len >= 1, got {p.target_len}")
        return length_score(text, p.target_len)
    raise OpError(f"score: rule {p.rule!r} is not a plain rule")


@cache
def _version() -> str:
    # the judge's scores come out of generate's decoding loop, so its code is part of ours
    parts = source_hash(sys.modules[__name__]) + GenerateExecutor().version
    return "1+" + hashlib.sha256(parts.encode()).hexdigest()[:12]


class ScoreExecutor:
    id = "score"
    kind = "score"
    max_batch = SCORE_MAX_BATCH

    @property
    def version(self) -> str:
        return _version()

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        judged: dict[ScoreParams, list[tuple[int, Record, str]]] = {}
        for i, op in enumerate(batch):
            try:
                p: ScoreParams = params_as(self.id, ScoreParams, op.params)
                record = one_record(op)
                if p.rule != "judge":
                    outcomes[i] = [{**record, p.output_field: rule_score(p, record)}]
                else:
                    judged.setdefault(p, []).append((i, record, _judge_prompt(p, record)))
            except OpError as exc:
                outcomes[i] = exc
        for p, rows in judged.items():
            for (i, _, _), outcome in zip(rows, _judge(p, rows, model), strict=True):
                outcomes[i] = outcome
        return [o if o is not None else OpError("internal: no outcome") for o in outcomes]


def _judge_prompt(p: ScoreParams, record: Record) -> str:
    # text.template's formatter: judge templates come from tenants' specs, so {field}
    # and {field[key]} only, never attribute access into interpreter objects
    try:
        filled = text_template(record, p.judge_template, _JUDGE_PROMPT)[_JUDGE_PROMPT]
    except KeyError as exc:
        raise OpError(f"score judge: the template needs field {exc.args[0]!r}") from exc
    except (ValueError, IndexError, TypeError) as exc:
        raise OpError(f"score judge: bad judge_template: {exc}") from exc
    return str(filled)


def _judge(p: ScoreParams, rows: list[tuple[int, Record, str]], model: Any | None) -> list[Outcome]:
    """Greedy-generate every row's judge reply in batches of generate's own size."""
    if model is None:
        return [OpError("score judge: needs the node's `model`, and none was loaded") for _ in rows]
    gen = GenerateExecutor()
    gen_params = {
        "prompt_field": _JUDGE_PROMPT,
        "output_field": _JUDGE_REPLY,
        "max_new_tokens": p.max_new_tokens,
    }
    ops = [OpInput(f"judge{i}", gen_params, [[{_JUDGE_PROMPT: prompt}]]) for i, _, prompt in rows]
    replies: list[Outcome] = []
    for start in range(0, len(ops), gen.max_batch):  # generate's memory bound, not ours
        replies.extend(gen.run(ops[start : start + gen.max_batch], model))
    outcomes: list[Outcome] = []
    for (_, record, _), reply in zip(rows, replies, strict=True):
        if isinstance(reply, OpError):
            outcomes.append(OpError(f"score judge: {reply}"))
            continue
        text = str(reply[0][_JUDGE_REPLY])
        # no number: 0, with the reply kept alongside so a useless judge is visible
        score = judge_score(text)
        score = 0.0 if score is None else score
        outcomes.append([{**record, p.output_field: score, "judge_raw": text}])
    return outcomes
