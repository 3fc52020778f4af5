"""Spec validation: every bad spec gets a clear error naming the problem, before publish."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowmesh.engine.spec import SpecError, find_cycle, load_spec, parse_spec, topo_order

REPO = Path(__file__).resolve().parent.parent


def spec(*nodes: dict, datasets: dict | None = None) -> dict:
    return {
        "name": "t",
        "datasets": datasets if datasets is not None else {"src": {"records": [{"text": "a"}]}},
        "nodes": list(nodes),
    }


def problems_of(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return "\n".join(info.value.problems)


def test_valid_spec_parses_and_orders() -> None:
    s = parse_spec(
        spec(
            {
                "name": "b",
                "op": "filter",
                "fn": "field.exists",
                "input": "a",
                "params": {"field": "text"},
            },
            {
                "name": "a",
                "op": "map",
                "fn": "text.upper",
                "input": "src",
                "params": {"field": "text"},
            },
            {"name": "g", "op": "group", "input": "b", "params": {"by": "text"}},
        )
    )
    assert topo_order(s) == ["a", "b", "g"]
    assert s.nodes[0].inputs == ["a"]


def test_unknown_operator() -> None:
    msg = problems_of(spec({"name": "a", "op": "teleport", "input": "src"}))
    assert "unknown operator 'teleport'" in msg and "generate" in msg


def test_missing_input() -> None:
    msg = problems_of(spec({"name": "a", "op": "map", "fn": "text.upper", "input": "nope"}))
    assert "missing input 'nope'" in msg


def test_cycle_is_reported_with_its_path() -> None:
    msg = problems_of(
        spec(
            {"name": "a", "op": "map", "fn": "text.upper", "input": "c"},
            {"name": "b", "op": "map", "fn": "text.upper", "input": "a"},
            {"name": "c", "op": "map", "fn": "text.upper", "input": "b"},
        )
    )
    assert "cycle:" in msg
    assert all(n in msg for n in "abc")


def test_bad_param_types() -> None:
    msg = problems_of(
        spec(
            {
                "name": "g",
                "op": "generate",
                "model": "tiny-llama",
                "input": "src",
                "params": {"max_new_tokens": "lots"},
            }
        )
    )
    assert "node 'g'" in msg and "max_new_tokens" in msg
    msg = problems_of(
        spec(
            {
                "name": "g",
                "op": "generate",
                "model": "m",
                "input": "src",
                "params": {"max_new_tokens": 0},
            }
        )
    )
    assert "max_new_tokens" in msg
    msg = problems_of(spec({"name": "j", "op": "group", "input": "src", "params": {"bye": "x"}}))
    assert "bye" in msg


def test_structural_problems_are_all_reported_at_once() -> None:
    msg = problems_of(
        spec(
            {"name": "a", "op": "map", "input": "src"},  # no fn
            {"name": "a", "op": "tokenize", "input": "src", "fn": "x"},  # duplicate, stray fn
            {"name": "j", "op": "join", "input": "src", "params": {"on": "id"}},  # 1 of 2 inputs
            {"name": "g", "op": "generate", "input": "src"},  # no model
        )
    )
    for needle in [
        "needs `fn`",
        "defined twice",
        "takes no `fn`",
        "takes 2 input(s), got 1",
        "needs `model`",
    ]:
        assert needle in msg


def test_schema_errors_are_clear() -> None:
    assert "nodes" in problems_of({"name": "x"})
    assert "mapping" in problems_of(["not", "a", "spec"])  # type: ignore[arg-type]
    msg = problems_of(
        spec({"name": "a", "op": "map", "fn": "text.upper", "input": "src", "colour": "red"})
    )
    assert "colour" in msg


def test_dataset_needs_exactly_one_source() -> None:
    msg = problems_of(
        spec(
            {"name": "a", "op": "map", "fn": "f", "input": "src"},
            datasets={"src": {"path": "x.jsonl", "records": []}},
        )
    )
    assert "exactly one of path, records, digest" in msg


def test_find_cycle_none_for_dag() -> None:
    s = parse_spec(spec({"name": "a", "op": "map", "fn": "text.upper", "input": "src"}))
    assert find_cycle(s) is None


def test_demo_workflow_loads_with_resolved_paths() -> None:
    s = load_spec(REPO / "configs" / "workflows" / "demo.yaml")
    path = s.datasets["questions"].path
    assert path is not None and Path(path).is_file()


# --- limits and catalog checks (issue 17 item 1, issue 15 item 5) ---------------------


def chain(n: int) -> dict:
    nodes = [{"name": "n0", "op": "map", "fn": "text.upper", "input": "src"}]
    nodes += [
        {"name": f"n{i}", "op": "map", "fn": "text.upper", "input": f"n{i - 1}"}
        for i in range(1, n)
    ]
    return spec(*nodes)


def test_validation_is_linear_in_the_graph() -> None:
    """Counted in Python lines executed, not seconds: deterministic on a busy machine.
    A 5,000-node chain took 22 s when validation grew with the square of the nodes."""
    import sys
    from types import FrameType
    from typing import Any

    from flowmesh.engine import spec as spec_mod

    def lines_to_validate(data: dict) -> int:
        count = 0

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal count
            if event == "line":
                count += 1
            return trace

        sys.settrace(trace)
        try:
            topo_order(parse_spec(data))
        finally:
            sys.settrace(None)
        return count

    small = lines_to_validate(chain(spec_mod.MAX_NODES // 10))
    big = lines_to_validate(chain(spec_mod.MAX_NODES))
    # linear: 10x the nodes, about 10x the work (quadratic: 100x)
    assert big / small < 15, (small, big)


def test_limits_give_clear_errors() -> None:
    from flowmesh.engine import spec as spec_mod

    over = problems_of(chain(spec_mod.MAX_NODES + 1))
    assert f"the limit is {spec_mod.MAX_NODES}" in over

    deep: object = "x"
    for _ in range(900):
        deep = {"d": deep}
    node = {"name": "a", "op": "map", "fn": "text.upper", "input": "src"}
    nested = problems_of(spec(node, datasets={"src": {"records": [{"text": "a"}, {"d": deep}]}}))
    assert f"record 1 is nested deeper than {spec_mod.MAX_DEPTH} levels" in nested

    big = {"text": "x" * (spec_mod.MAX_RECORD_BYTES + 1)}
    assert "record 0 is" in problems_of(spec(node, datasets={"src": {"records": [big]}}))

    many = [{"text": "a"}] * (spec_mod.MAX_DATASET_RECORDS + 1)
    assert "the limit is" in problems_of(spec(node, datasets={"src": {"records": many}}))


def test_every_problem_is_reported_at_once_with_the_catalog() -> None:
    from flowmesh.engine.spec import Catalog, validate
    from flowmesh.topics.codec import convert
    from flowmesh.topics.messages import WorkflowSpec

    data = spec(
        {"name": "a", "op": "map", "fn": "no.such", "inputs": ["b"]},
        {"name": "b", "op": "generate", "model": "nope", "inputs": ["a"]},
        {"name": "c", "op": "filter", "fn": "field.min_words", "inputs": ["src"],
         "params": {"min": "three", "colour": 1}},
        {"name": "d", "op": "group", "inputs": ["missing"], "params": {"by": "x", "agg": "count"}},
        {"name": "e", "op": "generate", "model": "m", "adapter": "c", "inputs": ["src"]},
    )  # fmt: skip
    catalog = Catalog(
        executors=frozenset({"map.text.upper", "filter.field.min_words", "generate", "group"}),
        models=frozenset({"m"}),
        signatures={"filter.field.min_words": {"min": ("int", True), "field": ("str", False)}},
    )
    with pytest.raises(SpecError) as info:
        validate(convert(data, WorkflowSpec), catalog)
    text = "\n".join(info.value.problems)
    assert "cycle: " in text
    assert "no worker runs map.no.such" in text
    assert "unknown model 'nope'" in text
    assert "parameter 'min' is int, got str" in text
    assert "takes no parameter 'colour'" in text
    assert "missing input 'missing'" in text
    assert "adapter 'c' is not a train node" in text
