"""The CPU executors: results equal plain Python, errors stay with their operator, and
versions follow the code."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmesh.topics.operators import KINDS, executor_id
from flowmesh.workers.executors import (
    FilterExecutor,
    GroupExecutor,
    JoinExecutor,
    MapExecutor,
    OpError,
    OpInput,
    TokenizeExecutor,
    builtin_executors,
    load_plugins,
)
from flowmesh.workers.executors import transform as transform_mod
from flowmesh.workers.executors.base import Outcome
from flowmesh.workers.executors.transform import transform

REPO = Path(__file__).resolve().parents[1]

RECORDS: list[dict[str, Any]] = [
    {"id": 1, "text": "  Hello   World  ", "label": "a", "score": 3},
    {"id": 2, "text": "The quick brown fox", "label": "b", "score": 5.5},
    {"id": 3, "text": "", "label": "a", "score": -1},
    {"id": 4, "text": "Ünïcode\tand\nnewlines here", "label": None, "score": 0},
]


def rec_op(record: dict[str, Any], params: dict[str, Any] | None = None) -> OpInput:
    return OpInput(key=uuid.uuid4().hex, params=params or {}, inputs=[[record]])


def run_records(ex: Any, records: list[dict[str, Any]], params: dict[str, Any]) -> list[Outcome]:
    outcomes: list[Outcome] = ex.run([rec_op(r, params) for r in records], None)
    return outcomes


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(transform_mod._REGISTRY)
    yield
    transform_mod._REGISTRY.clear()
    transform_mod._REGISTRY.update(saved)


def write_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    name = f"plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    # no .pyc: a rewrite within the same second could otherwise reload stale bytecode
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return name


# --- map / filter built-ins equal plain Python ----------------------------------------

MAP_CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("text.upper", {}, lambda r: {**r, "text": r["text"].upper()}),
    ("text.lower", {}, lambda r: {**r, "text": r["text"].lower()}),
    ("text.strip", {}, lambda r: {**r, "text": r["text"].strip()}),
    ("text.normalize", {}, lambda r: {**r, "text": " ".join(r["text"].lower().split())}),
    (
        "text.template",
        {"template": "#{id} [{label}] {text}", "output_field": "prompt"},
        lambda r: {**r, "prompt": "#{id} [{label}] {text}".format_map(r)},
    ),
    ("text.word_count", {"field": "text"}, lambda r: {**r, "word_count": len(r["text"].split())}),
    (
        "text.word_count",
        {"output_field": "n"},
        lambda r: {**r, "n": len(r["text"].split())},
    ),
    (
        "field.rename",
        {"mapping": {"text": "body", "id": "uid"}},
        lambda r: {"uid": r["id"], "body": r["text"], "label": r["label"], "score": r["score"]},
    ),
    ("field.select", {"fields": ["score", "id"]}, lambda r: {"score": r["score"], "id": r["id"]}),
    ("field.set", {"values": {"lang": "en", "id": 0}}, lambda r: {**r, "lang": "en", "id": 0}),
]


@pytest.mark.parametrize(("fn", "args", "expected"), MAP_CASES)
def test_map_transforms_equal_python(fn: str, args: dict[str, Any], expected: Any) -> None:
    ex = MapExecutor(fn)
    assert (ex.id, ex.kind) == (f"map.{fn}", "map")
    outcomes = run_records(ex, RECORDS, args)
    assert outcomes == [[expected(r)] for r in RECORDS]
    # records are plain values: the input must come back untouched
    assert RECORDS[0]["text"] == "  Hello   World  "


FILTER_CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("field.min_words", {"min": 2}, lambda r: len(r["text"].split()) >= 2),
    ("field.min_words", {"min": 0, "field": "text"}, lambda r: True),
    ("text.contains", {"substring": "HELLO"}, lambda r: "hello" in r["text"].lower()),
    (
        "text.contains",
        {"substring": "Hello", "case_sensitive": True},
        lambda r: "Hello" in r["text"],
    ),
    ("field.compare", {"field": "score", "op": ">=", "value": 3}, lambda r: r["score"] >= 3),
    ("field.compare", {"field": "label", "op": "==", "value": "a"}, lambda r: r["label"] == "a"),
    ("field.compare", {"field": "id", "op": "!=", "value": 2}, lambda r: r["id"] != 2),
    ("field.compare", {"field": "score", "op": "<", "value": 0}, lambda r: r["score"] < 0),
    ("field.exists", {"field": "label"}, lambda r: r.get("label") is not None),
    ("field.exists", {"field": "nope"}, lambda r: False),
]


@pytest.mark.parametrize(("fn", "args", "keep"), FILTER_CASES)
def test_filter_transforms_equal_python(fn: str, args: dict[str, Any], keep: Any) -> None:
    ex = FilterExecutor(fn)
    assert (ex.id, ex.kind) == (f"filter.{fn}", "filter")
    assert run_records(ex, RECORDS, args) == [[r] if keep(r) else [] for r in RECORDS]


def test_kind_mismatch_and_unknown_transform_are_refused() -> None:
    with pytest.raises(ValueError, match="is a filter"):
        MapExecutor("field.exists")
    with pytest.raises(KeyError, match="no transform named"):
        FilterExecutor("no.such.thing")


# --- errors belong to one operator ----------------------------------------------------


def test_missing_field_fails_only_that_operator() -> None:
    records: list[dict[str, Any]] = [{"text": "a b"}, {"other": 1}, {"text": "c"}]
    outcomes = run_records(MapExecutor("text.upper"), records, {})
    assert outcomes[0] == [{"text": "A B"}]
    assert outcomes[2] == [{"text": "C"}]
    err = outcomes[1]
    assert isinstance(err, OpError)
    assert "text.upper" in str(err) and "'text'" in str(err)


@pytest.mark.parametrize(
    ("fn", "args", "message"),
    [
        ("map", ("field.rename", {}), r"field\.rename.*bad args"),
        ("map", ("field.select", {"fields": ["id"], "extra": 1}), r"field\.select.*bad args"),
        ("map", ("field.rename", {"mapping": {"nope": "x"}}), r"no field 'nope'"),
        ("map", ("text.upper", {"field": "id"}), r"text\.upper.*int, expected str"),
        ("map", ("text.template", {"template": "{missing}", "output_field": "o"}), "'missing'"),
        ("map", ("text.template", {"template": "{text.__class__}", "output_field": "o"}), "attr"),
        ("filter", ("field.compare", {"field": "text", "op": ">", "value": 1}), "TypeError"),
        ("filter", ("field.compare", {"field": "id", "op": "~", "value": 1}), "op must be"),
        ("filter", ("field.min_words", {"field": "text"}), r"field\.min_words.*bad args"),
    ],
)
def test_bad_args_become_op_errors(fn: str, args: tuple[str, dict[str, Any]], message: str) -> None:
    name, params = args
    ex = MapExecutor(name) if fn == "map" else FilterExecutor(name)
    (outcome,) = ex.run([rec_op({"id": 1, "text": "x y"}, params)], None)
    assert isinstance(outcome, OpError), outcome
    assert re.search(message, str(outcome)), str(outcome)


def test_user_transform_failures_and_bad_returns(clean_registry: None) -> None:
    @transform("test.explode", "map")
    def explode(record: dict[str, Any]) -> dict[str, Any]:
        if record["n"] == 2:
            raise RuntimeError("boom")
        if record["n"] == 3:
            return "not a record"  # type: ignore[return-value]
        if record["n"] == 4:
            return {"x": object()}
        record["seen"] = True  # mutating its argument must not leak into the input
        return record

    @transform("test.truthy", "filter")
    def truthy(record: dict[str, Any]) -> bool:
        return record["n"]  # type: ignore[no-any-return]

    inputs = [{"n": n} for n in (1, 2, 3, 4)]
    outcomes = MapExecutor("test.explode").run([rec_op(r) for r in inputs], None)
    assert outcomes[0] == [{"n": 1, "seen": True}] and inputs[0] == {"n": 1}
    assert [type(o) for o in outcomes[1:]] == [OpError] * 3
    assert "boom" in str(outcomes[1]) and "returned str" in str(outcomes[2])
    assert "non-JSON" in str(outcomes[3])
    flt = FilterExecutor("test.truthy").run([rec_op({"n": 1})], None)
    assert isinstance(flt[0], OpError) and "not a bool" in str(flt[0])


def test_record_executor_wants_exactly_one_record() -> None:
    op = OpInput("k", {}, [[{"text": "a"}, {"text": "b"}]])
    (outcome,) = MapExecutor("text.upper").run([op], None)
    assert isinstance(outcome, OpError) and "one input record" in str(outcome)


# --- versions follow the code ---------------------------------------------------------


def test_version_is_declared_plus_source_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: None
) -> None:
    body = """
        from flowmesh.workers.executors.transform import transform

        @transform("test.shout", "map", version="{v}")
        def shout(record, field="text"):
            return {{**record, field: record[field].upper() + "{suffix}"}}
    """
    module = write_plugin(tmp_path, monkeypatch, body.format(v="1", suffix="!"))
    load_plugins([module])
    v1 = MapExecutor("test.shout").version
    assert re.fullmatch(r"1\+[0-9a-f]{12}", v1)
    assert MapExecutor("test.shout").run([rec_op({"text": "hi"})], None) == [[{"text": "HI!"}]]

    def rewrite(v: str, suffix: str) -> str:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(body.format(v=v, suffix=suffix)))
        importlib.invalidate_caches()
        importlib.reload(sys.modules[module])  # a re-registration from the same origin
        return MapExecutor("test.shout").version

    v2 = rewrite("1", "!!")  # the code changed, the declared version did not
    assert v2 != v1 and v2.startswith("1+")
    assert MapExecutor("test.shout").run([rec_op({"text": "hi"})], None) == [[{"text": "HI!!"}]]
    v3 = rewrite("2", "!!")  # bumped declared version (the decorator line is source too)
    assert v3.startswith("2+") and v3 != v2


def test_version_without_source_uses_bytecode(clean_registry: None) -> None:
    def build(constant: str, method: str) -> str:
        namespace: dict[str, Any] = {}
        exec(  # no file behind it, so inspect.getsource fails
            f"def fn(record):\n    return {{**record, 'x': {constant!r}.{method}()}}\n", namespace
        )
        name = f"test.exec.{uuid.uuid4().hex[:6]}"
        transform(name, "map")(namespace["fn"])
        return MapExecutor(name).version

    assert build("a", "upper") == build("a", "upper")
    assert build("a", "upper") != build("b", "upper")  # constants count
    assert build("a", "upper") != build("a", "lower")  # names count


def test_builtin_executor_versions_hash_their_class() -> None:
    for ex in (TokenizeExecutor(), JoinExecutor(), GroupExecutor()):
        assert ex.version == f"1+{transform_mod.source_hash(type(ex))}"
    assert len({TokenizeExecutor().version, JoinExecutor().version, GroupExecutor().version}) == 3


def test_duplicate_name_from_another_module_is_refused(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        transform("text.upper", "map")(lambda record: record)


# --- plugins and the executor table ---------------------------------------------------


def test_builtin_executors_cover_kinds_and_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: None
) -> None:
    module = write_plugin(
        tmp_path,
        monkeypatch,
        """
        from flowmesh.workers.executors.transform import transform

        @transform("test.has_id", "filter")
        def has_id(record):
            return "id" in record
        """,
    )
    table = builtin_executors([module])
    assert "filter.test.has_id" in table
    for key, ex in table.items():
        assert key == ex.id
        assert ex.kind in KINDS
        fn = key.removeprefix(f"{ex.kind}.") if KINDS[ex.kind].needs_fn else None
        assert executor_id(ex.kind, fn) == key
        # model-backed kinds are bounded by memory; score (a judge generates) and tool (a
        # tool may wait on something slow) hold 64; a train step takes one dataset
        own = {"generate": 16, "embed": 64, "score": 64, "tool": 64, "train": 1}
        assert ex.max_batch == own.get(ex.kind, {"record": 256, "all": 4}[KINDS[ex.kind].fanout])
    assert set(KINDS) == {ex.kind for ex in table.values()}


def test_importing_executors_does_not_import_torch() -> None:
    code = (
        "import sys, workers.executors as e; e.builtin_executors(); print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# --- tokenize -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, lambda t: t.lower().split()),
        ({"mode": "words"}, lambda t: re.findall(r"\w+", t.lower())),
        ({"mode": "chars", "lowercase": False}, list),
        ({"mode": "whitespace", "lowercase": False}, lambda t: t.split()),
    ],
)
def test_tokenize_equals_python(params: dict[str, Any], expected: Any) -> None:
    outcomes = run_records(TokenizeExecutor(), RECORDS, params)
    for rec, outcome in zip(RECORDS, outcomes, strict=True):
        tokens = expected(rec["text"])
        assert outcome == [{**rec, "tokens": tokens, "n_tokens": len(tokens)}]


def test_tokenize_errors() -> None:
    ex = TokenizeExecutor()
    ok, missing, badparams = ex.run(
        [
            rec_op({"body": "A b"}, {"field": "body", "output_field": "t"}),
            rec_op({"text": 3}),
            rec_op({"text": "a"}, {"mode": "sentences"}),
        ],
        None,
    )
    assert ok == [{"body": "A b", "t": ["a", "b"], "n_tokens": 2}]
    assert isinstance(missing, OpError) and "int, expected str" in str(missing)
    assert isinstance(badparams, OpError) and "bad params" in str(badparams)


# --- join -----------------------------------------------------------------------------

LEFT: list[dict[str, Any]] = [
    {"k": 1, "a": "l1", "both": "left"},
    {"k": 2, "a": "l2", "both": "left"},
    {"k": 3, "a": "l3"},
    {"a": "no key"},
    {"k": 1, "a": "l4"},
    {"k": [1, 2], "a": "list key"},
]
RIGHT: list[dict[str, Any]] = [
    {"k": 1, "b": "r1", "both": "right"},
    {"k": 2, "b": "r2"},
    {"k": 1, "b": "r3"},
    {"k": 1.0, "b": "float key"},
    {"k": [1, 2], "b": "list key"},
    {"k": None, "b": "null key"},
]


def reference_join(left: list[dict[str, Any]], right: list[dict[str, Any]], how: str) -> list[Any]:
    out = []
    for lrec in left:
        matches = [
            {**lrec, **rrec, "k": lrec["k"]}
            for rrec in right
            if lrec.get("k") is not None
            and rrec.get("k") is not None
            and lrec["k"] == rrec["k"]
            and type(lrec["k"]) is type(rrec["k"])  # JSON equality: 1 is not 1.0
        ]
        out.extend(matches)
        if not matches and how == "left":
            out.append(lrec)
    return out


@pytest.mark.parametrize("how", ["inner", "left"])
def test_join_equals_reference(how: str) -> None:
    op = OpInput("k", {"on": "k", "how": how}, [LEFT, RIGHT])
    (outcome,) = JoinExecutor().run([op], None)
    assert outcome == reference_join(LEFT, RIGHT, how)
    if how == "inner":
        assert outcome[0] == {"k": 1, "a": "l1", "both": "right", "b": "r1"}  # right wins


def test_join_errors_are_per_operator() -> None:
    good = OpInput("a", {"on": "k"}, [LEFT, RIGHT])
    one_input = OpInput("b", {"on": "k"}, [LEFT])
    bad = OpInput("c", {"how": "outer", "on": "k"}, [LEFT, RIGHT])
    outcomes = JoinExecutor().run([good, one_input, bad], None)
    assert outcomes[0] == reference_join(LEFT, RIGHT, "inner")
    assert isinstance(outcomes[1], OpError) and "2 inputs" in str(outcomes[1])
    assert isinstance(outcomes[2], OpError) and "bad params" in str(outcomes[2])


# --- group ----------------------------------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {"g": "b", "v": 2, "n": "x"},
    {"g": "a", "v": 1.5, "n": "y"},
    {"g": "b", "v": 4, "n": "z"},
    {"g": 10, "v": 1, "n": "w"},
    {"v": 7, "n": "no group"},
    {"g": "a", "v": -3, "n": "u"},
]


def reference_groups(rows: list[dict[str, Any]]) -> list[tuple[Any, list[dict[str, Any]]]]:
    groups: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
    for row in rows:
        value = row.get("g")
        groups.setdefault(repr(value), (value, []))[1].append(row)
    return sorted(groups.values(), key=lambda kv: str(kv[0]))


@pytest.mark.parametrize("agg", ["count", "collect", "collect_records", "sum", "mean"])
def test_group_equals_reference(agg: str) -> None:
    params: dict[str, Any] = {"by": "g", "agg": agg.removesuffix("_records")}
    if agg != "collect_records":
        params["field"] = "v" if agg in ("sum", "mean") else "n"
    (outcome,) = GroupExecutor().run([OpInput("k", params, [ROWS])], None)
    expected = []
    for value, rows in reference_groups(ROWS):
        vs = [r["v"] for r in rows]
        result = {
            "count": len(rows),
            "collect": [r["n"] for r in rows],
            "collect_records": rows,
            "sum": sum(vs),
            "mean": sum(vs) / len(vs),
        }[agg]
        name = {"collect": "items", "collect_records": "items"}.get(agg, agg)
        expected.append({"g": value, name: result})
    assert outcome == expected
    assert [str(o["g"]) for o in outcome] == ["10", "None", "a", "b"]


def test_group_errors() -> None:
    ex = GroupExecutor()
    outcomes = ex.run(
        [
            OpInput("1", {"by": "g", "agg": "sum"}, [ROWS]),
            OpInput("2", {"by": "g", "agg": "sum", "field": "n"}, [ROWS]),
            OpInput("3", {"by": "g"}, [ROWS]),
            OpInput("4", {"by": "count"}, [ROWS]),
        ],
        None,
    )
    assert isinstance(outcomes[0], OpError) and "needs `field`" in str(outcomes[0])
    assert isinstance(outcomes[1], OpError) and "needs numbers" in str(outcomes[1])
    assert outcomes[2] == [
        {"g": value, "count": len(rows)} for value, rows in reference_groups(ROWS)
    ]
    assert isinstance(outcomes[3], OpError) and "clashes" in str(outcomes[3])


def test_group_order_is_independent_of_input_order() -> None:
    ex = GroupExecutor()
    rows: list[dict[str, Any]] = [{"g": 1}, {"g": "1"}, {"g": 2}, {"g": "1"}]
    a = ex.run([OpInput("a", {"by": "g"}, [rows])], None)
    b = ex.run([OpInput("b", {"by": "g"}, [rows[::-1]])], None)
    assert a == b
    assert a[0] == [{"g": "1", "count": 2}, {"g": 1, "count": 1}, {"g": 2, "count": 1}]
