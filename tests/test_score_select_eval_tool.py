"""score, select, eval and tool executors: results equal what plain Python computes on
hand-made records, errors stay with their operator, and a non-deterministic tool's
version carries the marker that keeps it from ever being deduplicated."""

from __future__ import annotations

import datetime
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmesh.topics.operators import NONDETERMINISTIC, GenerateParams, ScoreParams
from flowmesh.workers.executors import (
    EvalExecutor,
    GenerateExecutor,
    OpError,
    OpInput,
    ScoreExecutor,
    SelectExecutor,
    ToolExecutor,
    builtin_executors,
)
from flowmesh.workers.executors import tool as tool_mod
from flowmesh.workers.executors.base import Outcome
from flowmesh.workers.executors.score import judge_score
from flowmesh.workers.executors.tool import load_tool_plugins, tool

PLUGINS = Path(__file__).resolve().parent / "plugins"


def rec_op(record: dict[str, Any], params: dict[str, Any] | None = None) -> OpInput:
    return OpInput(key=uuid.uuid4().hex, params=params or {}, inputs=[[record]])


def all_op(records: list[dict[str, Any]], params: dict[str, Any]) -> OpInput:
    return OpInput(key=uuid.uuid4().hex, params=params, inputs=[records])


def ok(outcome: Outcome) -> list[dict[str, Any]]:
    assert not isinstance(outcome, OpError), outcome
    return outcome


def error(outcome: Outcome, pattern: str) -> None:
    assert isinstance(outcome, OpError), outcome
    assert re.search(pattern, str(outcome)), str(outcome)


# --- score: rules ---------------------------------------------------------------------

RECORDS: list[dict[str, Any]] = [
    {"completion": "Paris", "answer": "paris"},
    {"completion": "  PARIS \n", "answer": "Paris "},
    {"completion": "It is Paris, I think", "answer": "paris"},
    {"completion": "Berlin", "answer": "Paris"},
    {"completion": "The answer is 42.", "answer": 42},
    {"completion": "", "answer": "x"},
    {"completion": "one two three four five six seven eight", "answer": "ÉTÉ"},
    {"completion": "ete", "answer": "été"},
    {"completion": "Straße", "answer": "STRASSE"},  # casefold, not lower
]


def norm(s: Any) -> str:
    return str(s).strip().casefold()


def words(r: dict[str, Any]) -> int:
    return len(r["completion"].split())


RULE_CASES: list[tuple[dict[str, Any], Any]] = [
    ({"rule": "exact_match"}, lambda r: float(norm(r["completion"]) == norm(r["answer"]))),
    ({"rule": "contains"}, lambda r: float(norm(r["answer"]) in norm(r["completion"]))),
    (
        {"rule": "regex", "pattern": r"\d+"},
        lambda r: 1.0 if re.search(r"\d+", r["completion"]) else 0.0,
    ),
    (
        {"rule": "regex", "pattern": r"^[A-Z]"},
        lambda r: 1.0 if re.search(r"^[A-Z]", r["completion"]) else 0.0,
    ),
    ({"rule": "length", "target_len": 4}, lambda r: max(0.0, 1 - abs(words(r) - 4) / 4)),
    ({"rule": "length", "target_len": 1}, lambda r: max(0.0, 1 - abs(words(r) - 1) / 1)),
]


@pytest.mark.parametrize(("params", "expected"), RULE_CASES)
def test_rules_equal_python(params: dict[str, Any], expected: Any) -> None:
    outcomes = ScoreExecutor().run([rec_op(r, params) for r in RECORDS], None)
    for r, outcome in zip(RECORDS, outcomes, strict=True):
        assert ok(outcome) == [{**r, "score": expected(r)}]


def test_rule_values_by_hand() -> None:
    ex = ScoreExecutor()
    cases: list[tuple[dict[str, Any], dict[str, Any], float]] = [
        ({"rule": "exact_match"}, {"completion": " Paris ", "answer": "PARIS"}, 1.0),
        ({"rule": "exact_match"}, {"completion": "Paris!", "answer": "Paris"}, 0.0),
        ({"rule": "contains"}, {"completion": "so: 42", "answer": 42}, 1.0),
        ({"rule": "length", "target_len": 4}, {"completion": "a b"}, 0.5),
        ({"rule": "length", "target_len": 4}, {"completion": "a b c d e f g h i"}, 0.0),
        ({"rule": "length", "target_len": 2}, {"completion": ""}, 0.0),
        (
            {"rule": "regex", "pattern": "yes", "field": "t", "output_field": "r"},
            {"t": "oh yes"},
            1.0,
        ),
    ]
    outcomes = ex.run([rec_op(rec, params) for params, rec, _ in cases], None)
    for (params, rec, value), outcome in zip(cases, outcomes, strict=True):
        assert ok(outcome) == [{**rec, params.get("output_field", "score"): value}]


def test_rule_errors_are_per_operator() -> None:
    good = {"completion": "a", "answer": "a"}
    outcomes = ScoreExecutor().run(
        [
            rec_op(good, {"rule": "regex", "pattern": "(unclosed"}),
            rec_op(good, {"rule": "regex"}),
            rec_op(good, {"rule": "length"}),
            rec_op({"completion": "a"}, {"rule": "exact_match"}),
            rec_op({"completion": None, "answer": "a"}, {"rule": "contains"}),
            rec_op(good, {"rule": "bleu"}),
            rec_op(good, {"rule": "exact_match"}),
            rec_op({**good, "prompt": "q"}, {"rule": "judge"}),  # no model loaded
        ],
        None,
    )
    error(outcomes[0], r"bad pattern '\(unclosed'")
    error(outcomes[1], "needs `pattern`")
    error(outcomes[2], "target_len")
    error(outcomes[3], "no field 'answer'")
    error(outcomes[4], "'completion' is NoneType")
    error(outcomes[5], "bad params")
    assert ok(outcomes[6]) == [{**good, "score": 1.0}]
    error(outcomes[7], "needs the node's `model`")


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("7", 0.7),
        (" 8.5/10, good", 0.85),
        ("Rating: 15", 1.0),
        ("-3", 0.0),
        ("10 out of 10", 1.0),
        ("it is 0", 0.0),
        ("no idea", None),
        ("", None),
    ],
)
def test_judge_parses_the_first_number(reply: str, score: float | None) -> None:
    assert judge_score(reply) == score


# --- score: the LLM judge on the tiny Llama -------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from flowmesh.workers.models import build_tiny_llama, load_model

    path: Path = tmp_path_factory.mktemp("tiny-llama")
    for name, data in build_tiny_llama().items():
        (path / name).write_bytes(data)
    return load_model(path, digest="0" * 64, name="tiny-llama")


QA: list[dict[str, Any]] = [
    {"id": i, "prompt": q, "completion": a}
    for i, (q, a) in enumerate(
        [
            ("What is the capital of France?", "Paris"),
            ("Count the words in this sentence.", "six"),
            ("2 + 2?", "4"),
            ("Translate the following sentence into French.", ""),
            ("How are you today?", "I am fine, thank you."),
        ]
    )
]


def test_judge_scores_every_record_with_generate(tiny: Any) -> None:
    params = {"rule": "judge", "max_new_tokens": 6}
    outcomes = ScoreExecutor().run([rec_op(r, params) for r in QA], tiny)
    p = ScoreParams(rule="judge", max_new_tokens=6)
    # the judge's reply is exactly what a generate node writes for the filled template
    gen_ops = [rec_op({"prompt": p.judge_template.format(**r)}, {"max_new_tokens": 6}) for r in QA]
    replies = [ok(o)[0]["completion"] for o in GenerateExecutor().run(gen_ops, tiny)]
    for r, reply, outcome in zip(QA, replies, outcomes, strict=True):
        (out,) = ok(outcome)
        assert out["judge_raw"] == reply
        expected = judge_score(reply)
        assert out == {**r, "score": 0.0 if expected is None else expected, "judge_raw": reply}
        assert 0.0 <= out["score"] <= 1.0
    # one batch or one at a time: the same scores
    alone = [ScoreExecutor().run([rec_op(r, params)], tiny)[0] for r in QA]
    assert alone == outcomes


def test_judge_errors_stay_with_their_operator(tiny: Any) -> None:
    template = {"rule": "judge", "judge_template": "Q: {question} A: {completion}"}
    outcomes = ScoreExecutor().run(
        [
            rec_op({"question": "why?", "completion": "because"}, template),
            rec_op({"completion": "no question"}, template),
            rec_op({"question": "x", "completion": "y"}, {**template, "judge_template": "{q.x}"}),
            rec_op({"completion": "a", "answer": "a"}, {"rule": "exact_match"}),
        ],
        tiny,
    )
    (first,) = ok(outcomes[0])
    assert 0.0 <= first["score"] <= 1.0 and isinstance(first["judge_raw"], str)
    error(outcomes[1], "needs field 'question'")
    error(outcomes[2], "attribute access")
    assert ok(outcomes[3]) == [{"completion": "a", "answer": "a", "score": 1.0}]
    assert GenerateParams().temperature == 0  # the judge is greedy: deterministic


# --- select ---------------------------------------------------------------------------

SAMPLES: list[dict[str, Any]] = [
    {"prompt": "p1", "id": 1, "sample": 0, "completion": "a", "score": 0.2},
    {"prompt": "p2", "id": 2, "sample": 0, "completion": "b", "score": 0.9},
    {"prompt": "p1", "id": 1, "sample": 1, "completion": "c", "score": 0.8},
    {"prompt": "p1", "id": 1, "sample": 2, "completion": "d", "score": 0.8},  # ties c
    {"prompt": "p3", "id": 3, "sample": 0, "completion": "e", "score": 0.5},  # alone
    {"prompt": "p2", "id": 2, "sample": 1, "completion": "f", "score": 0.1},
    {"prompt": "p4", "id": 4, "sample": 0, "completion": "g", "score": 1},  # all equal
    {"prompt": "p4", "id": 4, "sample": 1, "completion": "h", "score": 1},
    {"prompt": "p2", "id": 2, "sample": 2, "completion": "i", "score": 0.1},  # ties f
]


def groups_of(samples: list[dict[str, Any]], by: str) -> list[list[tuple[int, dict[str, Any]]]]:
    order: list[Any] = []
    for s in samples:
        if s[by] not in order:
            order.append(s[by])
    return [[(i, s) for i, s in enumerate(samples) if s[by] == g] for g in order]


def select(params: dict[str, Any], samples: list[dict[str, Any]] = SAMPLES) -> Outcome:
    (outcome,) = SelectExecutor().run([all_op(samples, params)], None)
    return outcome


def test_best_of_n_equals_python() -> None:
    # highest score; among equals the earliest (max() keeps the first maximum)
    expected = [max(g, key=lambda t: t[1]["score"])[1] for g in groups_of(SAMPLES, "prompt")]
    assert ok(select({"method": "best_of_n"})) == expected
    assert [r["completion"] for r in expected] == ["c", "b", "e", "g"]


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_top_k_equals_python(k: int) -> None:
    expected = []
    for g in groups_of(SAMPLES, "prompt"):
        expected += [s for _, s in sorted(g, key=lambda t: (-t[1]["score"], t[0]))[:k]]
    assert ok(select({"method": "top_k", "k": k})) == expected


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 2.0])
def test_rejection_equals_python(threshold: float) -> None:
    expected = [s for s in SAMPLES if s["score"] >= threshold]
    assert ok(select({"method": "rejection", "threshold": threshold})) == expected
    # no groups involved: records without the group field are fine
    bare = [{"completion": "x", "score": 1.0}]
    assert ok(select({"method": "rejection"}, bare)) == bare


def test_pairs_by_hand() -> None:
    assert ok(select({"method": "pairs"})) == [
        # p1: best c (first of the 0.8s), worst a; "sample" differs, so it is not shared
        {
            "prompt": "p1",
            "id": 1,
            "chosen": "c",
            "rejected": "a",
            "chosen_score": 0.8,
            "rejected_score": 0.2,
        },
        # p2: worst f (first of the 0.1s); p3 has one sample, p4 only equal scores
        {
            "prompt": "p2",
            "id": 2,
            "chosen": "b",
            "rejected": "f",
            "chosen_score": 0.9,
            "rejected_score": 0.1,
        },
    ]
    # grouped by id, the shared "prompt" field is still handed on for the DPO step
    by_id = ok(select({"method": "pairs", "group_by": "id", "text_field": "completion"}))
    assert [(r["id"], r["prompt"], r["chosen"], r["rejected"]) for r in by_id] == [
        (1, "p1", "c", "a"),
        (2, "p2", "b", "f"),
    ]


def test_select_errors() -> None:
    no_group = [*SAMPLES, {"completion": "z", "score": 0.3}]
    error(select({"method": "best_of_n"}, no_group), "no group field 'prompt'")
    bad_score = [*SAMPLES, {"prompt": "p1", "completion": "z", "score": "high"}]
    error(select({"method": "top_k"}, bad_score), "score field 'score' is 'high'")
    error(select({"method": "top_k", "k": 0}), "k must be >= 1")
    error(select({"method": "pairs", "text_field": "id"}), "not text")
    error(select({"method": "sample"}), "bad params")
    two = SelectExecutor().run([OpInput("k", {"method": "best_of_n"}, [SAMPLES, SAMPLES])], None)
    error(two[0], "needs 1 input")
    assert ok(select({"method": "best_of_n"}, [])) == []


# --- eval -----------------------------------------------------------------------------


@pytest.mark.parametrize("match", ["exact", "contains"])
def test_accuracy_equals_python(match: str) -> None:
    def hit(r: dict[str, Any]) -> bool:
        p, a = norm(r["completion"]), norm(r["answer"])
        return p == a if match == "exact" else a in p

    correct = sum(hit(r) for r in RECORDS)
    (outcome,) = EvalExecutor().run([all_op(RECORDS, {"metric": "accuracy", "match": match})], None)
    assert ok(outcome) == [
        {
            "metric": "accuracy",
            "value": correct / len(RECORDS),
            "n": len(RECORDS),
            "correct": correct,
        }
    ]
    assert 0 < correct < len(RECORDS)


def test_mean_and_empty_input() -> None:
    rows: list[dict[str, Any]] = [{"score": 0.5}, {"score": 1}, {"score": 0.0}, {"score": 0.25}]
    outcomes = EvalExecutor().run(
        [
            all_op(rows, {"metric": "mean", "field": "score"}),
            all_op([], {"metric": "mean", "field": "score"}),
            all_op([], {"metric": "accuracy"}),
            all_op([*rows, {"score": "x"}], {"metric": "mean", "field": "score"}),
            all_op([{"completion": "a"}], {"metric": "accuracy"}),
        ],
        None,
    )
    assert ok(outcomes[0]) == [{"metric": "mean", "value": 1.75 / 4, "n": 4}]
    assert ok(outcomes[1]) == [{"metric": "mean", "value": None, "n": 0}]
    assert ok(outcomes[2]) == [{"metric": "accuracy", "value": None, "n": 0, "correct": 0}]
    error(outcomes[3], "expected a number")
    error(outcomes[4], "no field 'answer'")


# --- tools ----------------------------------------------------------------------------


@pytest.fixture
def clean_tools() -> Iterator[None]:
    saved = dict(tool_mod._TOOLS)
    yield
    tool_mod._TOOLS.clear()
    tool_mod._TOOLS.update(saved)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2 + 3 * 4", 14),
        ("(1 + 2) ** 3", 27),
        ("7 / 2", 3.5),
        ("-2 ** 2", -4),
        (" 2 - -3 ", 5),
        ("1.5 * (4 - 2) / 0.5", 6.0),
        ("2 ** -1", 0.5),
        ("2 ** 100", 2**100),
    ],
)
def test_calculator_answers(expression: str, value: float) -> None:
    (outcome,) = ToolExecutor("calculator").run([rec_op({"expression": expression})], None)
    assert ok(outcome) == [{"expression": expression, "result": value}]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "Call is not allowed"),
        ("__import__('os').system('echo pwned')", "Call is not allowed"),
        ("(1).real", "Attribute is not allowed"),
        ("x + 1", "Name is not allowed"),
        ("'a' * 3", "Constant is not allowed"),
        ("True + 1", "Constant is not allowed"),
        ("[1, 2]", "List is not allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("7 // 2", "BinOp is not allowed"),
        ("9 ** 9 ** 9", "over 4096 bits"),
        ("10.0 ** 400", "OverflowError"),
        ("1e308 * 10", "not finite"),
        ("(-8) ** 0.5", "complex"),
        ("1 / 0", "ZeroDivisionError"),
        ("1 +", "SyntaxError"),
        ("1" * 1001, "longer than 1000"),
    ],
)
def test_calculator_refuses(expression: str, message: str) -> None:
    (outcome,) = ToolExecutor("calculator").run([rec_op({"expression": expression})], None)
    error(outcome, message)


def test_lookup_clock_random_choice() -> None:
    table = {"fr": "Paris", "de": "Berlin", "1": "one"}
    records: list[dict[str, Any]] = [{"key": "fr"}, {"key": 1}, {"key": "it"}]
    outcomes = ToolExecutor("lookup").run([rec_op(r, {"table": table}) for r in records], None)
    assert [ok(o)[0]["value"] for o in outcomes] == ["Paris", "one", None]
    (missing,) = ToolExecutor("lookup").run(
        [rec_op({"lang": "it"}, {"table": table, "key_field": "lang", "default": "?"})], None
    )
    assert ok(missing) == [{"lang": "it", "value": "?"}]

    before = datetime.datetime.now(datetime.UTC)
    (now,) = ToolExecutor("clock").run([rec_op({"id": 1})], None)
    stamp = datetime.datetime.fromisoformat(ok(now)[0]["now"])
    assert before <= stamp <= datetime.datetime.now(datetime.UTC)

    choices = ["a", "b", "c"]
    picks = ToolExecutor("random_choice").run([rec_op({}, {"choices": choices})] * 20, None)
    assert {ok(p)[0]["choice"] for p in picks} <= set(choices)
    from_field, neither = ToolExecutor("random_choice").run(
        [rec_op({"opts": [7]}, {"field": "opts"}), rec_op({})], None
    )
    assert ok(from_field) == [{"opts": [7], "choice": 7}]
    error(neither, "exactly one of")


def test_versions_mark_nondeterministic_tools() -> None:
    for name in ("clock", "random_choice"):
        assert ToolExecutor(name).version.endswith(NONDETERMINISTIC)
    for name in ("calculator", "lookup"):
        version = ToolExecutor(name).version
        assert re.fullmatch(r"1\+[0-9a-f]{12}", version) and not version.endswith(NONDETERMINISTIC)
    for ex in (ScoreExecutor(), SelectExecutor(), EvalExecutor()):
        assert re.fullmatch(r"1\+[0-9a-f]{12}", ex.version), ex.version


def test_tool_errors_are_per_operator(clean_tools: None) -> None:
    @tool("test.fragile", version="3")
    def fragile(record: dict[str, Any], mode: str = "ok") -> dict[str, Any]:
        if mode == "raise":
            raise RuntimeError("boom")
        if mode == "list":
            return [record]  # type: ignore[return-value]
        if mode == "object":
            return {"x": object()}
        record["touched"] = True  # mutating its argument must not leak into the input
        return record

    ex = ToolExecutor("test.fragile")
    assert (ex.id, ex.kind, ex.max_batch) == ("tool.test.fragile", "tool", 64)
    assert ex.version.startswith("3+") and not ex.version.endswith(NONDETERMINISTIC)
    record = {"n": 1}
    outcomes = ex.run(
        [
            rec_op(record),
            rec_op(record, {"mode": "raise"}),
            rec_op(record, {"mode": "list"}),
            rec_op(record, {"mode": "object"}),
            rec_op(record, {"wrong": 1}),
            OpInput("k", {}, [[record, record]]),
        ],
        None,
    )
    assert ok(outcomes[0]) == [{"n": 1, "touched": True}] and record == {"n": 1}
    error(outcomes[1], "test.fragile' failed: RuntimeError: boom")
    error(outcomes[2], "returned list, not a record")
    error(outcomes[3], "non-JSON")
    error(outcomes[4], r"bad args \['wrong'\]")
    error(outcomes[5], "one input record")
    with pytest.raises(ValueError, match="already registered"):
        tool("calculator")(lambda record: record)
    with pytest.raises(KeyError, match="no tool named"):
        ToolExecutor("no.such.tool")


def test_plugin_tools_and_the_executor_table(
    monkeypatch: pytest.MonkeyPatch, clean_tools: None
) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    sys.modules.pop("fm_test_tools", None)  # a fresh import registers its tools again
    try:
        check_plugin_tools()
    finally:
        # clean_tools restores the registry: the module must go with its registrations
        sys.modules.pop("fm_test_tools", None)


def check_plugin_tools() -> None:
    load_tool_plugins(["fm_test_tools"])
    echo, now = ToolExecutor("test.echo"), ToolExecutor("test.now_ns")
    assert not echo.version.endswith(NONDETERMINISTIC)
    assert now.version.endswith(NONDETERMINISTIC)
    (echoed,) = echo.run([rec_op({"text": "hi"})], None)
    assert ok(echoed) == [{"text": "hi", "echo": "hi"}]
    (stamped,) = now.run([rec_op({})], None)
    assert isinstance(ok(stamped)[0]["now_ns"], int)

    table = builtin_executors(["fm_test_tools"])
    for key in ("score", "select", "eval", "tool.calculator", "tool.clock", "tool.test.echo"):
        assert table[key].id == key
    assert table["tool.test.now_ns"].version == now.version
    assert {table[k].max_batch for k in ("score", "tool.lookup")} == {64}
    assert {table[k].max_batch for k in ("select", "eval")} == {4}
