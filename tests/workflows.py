"""The small workflow most end-to-end tests run: map each record, then maybe count."""

from __future__ import annotations

from typing import Any

from flowmesh.engine.spec import parse_spec
from flowmesh.topics.messages import WorkflowSpec


def map_then_count(
    name: str,
    rows: list[dict[str, Any]],
    fn: str,
    *,
    node: str = "up",
    count: str | None = "count",
    by: str = "colour",
    tenant: str = "default",
    **params: Any,
) -> WorkflowSpec:
    """`node` maps `fn` over each record's `text` (params go to the transform, e.g. the
    `delay` of tests/plugins' test.slow_upper); `count`, unless None, groups its output
    by `by`."""
    nodes: list[dict[str, Any]] = [
        {"name": node, "op": "map", "fn": fn, "input": "src", "params": {"field": "text", **params}}
    ]
    if count is not None:
        group = {"by": by, "agg": "count"}
        nodes.append({"name": count, "op": "group", "input": node, "params": group})
    return parse_spec(
        {"name": name, "tenant": tenant, "datasets": {"src": {"records": rows}}, "nodes": nodes}
    )
