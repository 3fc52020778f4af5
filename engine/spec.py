"""Workflow specs: loading from YAML and validation with clear errors.

Validation runs twice: in the client before anything is published, and in the planner on
receipt (a submission is untrusted input). It reports every problem at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from flowmesh.topics import codec
from flowmesh.topics.messages import DatasetSpec, NodeSpec, WorkflowSpec
from flowmesh.topics.operators import KINDS, parse_params

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SpecError(ValueError):
    """A workflow spec is invalid; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid workflow spec:\n  - " + "\n  - ".join(problems))


def _normalise_node(raw: Any, index: int) -> Any:
    # YAML convenience: `input: x` for a single input
    if isinstance(raw, Mapping) and "input" in raw:
        raw = dict(raw)
        single = raw.pop("input")
        if "inputs" in raw:
            raise SpecError([f"node #{index}: give `input` or `inputs`, not both"])
        raw["inputs"] = [single]
    return raw


def parse_spec(data: Any) -> WorkflowSpec:
    """Plain data (parsed YAML/JSON) -> WorkflowSpec, schema-checked and validated."""
    if not isinstance(data, Mapping):
        raise SpecError(["a workflow spec must be a mapping with `name` and `nodes`"])
    data = dict(data)
    if isinstance(data.get("nodes"), list):
        data["nodes"] = [_normalise_node(n, i) for i, n in enumerate(data["nodes"])]
    try:
        spec = codec.convert(data, WorkflowSpec)
    except codec.DecodeError as exc:
        raise SpecError([str(exc)]) from exc
    validate(spec)
    return spec


def load_spec(path: str | Path) -> WorkflowSpec:
    """Load a YAML workflow; dataset paths are resolved relative to the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([f"cannot read {path}: {exc}"]) from exc
    except (RecursionError, ValueError) as exc:
        # PyYAML builds some documents it parsed into errors of its own: nesting deeper
        # than Python's recursion limit, a date like 2024-13-45
        raise SpecError([f"cannot read {path}: {type(exc).__name__}: {exc}"]) from exc
    spec = parse_spec(data)
    datasets = {
        name: DatasetSpec(path=str((path.parent / ds.path).resolve()))
        if ds.path is not None
        else ds
        for name, ds in spec.datasets.items()
    }
    return WorkflowSpec(
        name=spec.name,
        nodes=spec.nodes,
        datasets=datasets,
        tenant=spec.tenant,
        dedup_scope=spec.dedup_scope,
    )


def validate(spec: WorkflowSpec) -> None:
    problems: list[str] = []
    if not spec.name.strip():
        problems.append("workflow `name` is empty")
    if not NAME_RE.match(spec.tenant):
        problems.append(f"tenant {spec.tenant!r} must match {NAME_RE.pattern}")
    if not spec.nodes:
        problems.append("workflow has no nodes")

    for name, ds in spec.datasets.items():
        if not NAME_RE.match(name):
            problems.append(f"dataset name {name!r} must match {NAME_RE.pattern}")
        given = [x for x in (ds.path, ds.records, ds.digest) if x is not None]
        if len(given) != 1:
            problems.append(f"dataset {name!r}: give exactly one of path, records, digest")
        if ds.digest is not None and not codec.is_digest(ds.digest):
            problems.append(f"dataset {name!r}: digest is not a sha256 hex digest")

    seen: set[str] = set()
    for node in spec.nodes:
        if not NAME_RE.match(node.name):
            problems.append(f"node name {node.name!r} must match {NAME_RE.pattern}")
        if node.name in seen:
            problems.append(f"node {node.name!r} is defined twice")
        if node.name in spec.datasets:
            problems.append(f"node {node.name!r} has the same name as a dataset")
        seen.add(node.name)
        problems.extend(_check_node(node, spec))

    if not problems:
        cycle = find_cycle(spec)
        if cycle:
            problems.append("cycle: " + " -> ".join(cycle))
    if problems:
        raise SpecError(problems)


def _check_node(node: NodeSpec, spec: WorkflowSpec) -> list[str]:
    where = f"node {node.name!r}"
    kind = KINDS.get(node.op)
    if kind is None:
        return [f"{where}: unknown operator {node.op!r} (known: {', '.join(sorted(KINDS))})"]
    problems = []
    n = len(node.inputs)
    if not kind.min_inputs <= n <= kind.max_inputs:
        want = (
            str(kind.min_inputs)
            if kind.min_inputs == kind.max_inputs
            else f"{kind.min_inputs}..{kind.max_inputs}"
        )
        problems.append(f"{where}: {node.op} takes {want} input(s), got {n}")
    names = {x.name for x in spec.nodes} | set(spec.datasets)
    for inp in node.inputs:
        if inp not in names:
            problems.append(f"{where}: missing input {inp!r} (no dataset or node of that name)")
        if inp == node.name:
            problems.append(f"{where}: reads its own output")
    if kind.needs_fn and not node.fn:
        problems.append(f"{where}: {node.op} needs `fn`, the name of a registered transform")
    if not kind.needs_fn and node.fn:
        problems.append(f"{where}: {node.op} takes no `fn`")
    if node.fn is not None and not re.match(r"^[A-Za-z0-9_.-]{1,128}$", node.fn):
        problems.append(f"{where}: fn {node.fn!r} is not a valid transform name")
    if kind.model == "required" and not node.model:
        problems.append(f"{where}: {node.op} needs `model`")
    if kind.model == "none" and node.model:
        problems.append(f"{where}: {node.op} takes no `model`")
    if node.adapter is not None:
        if kind.model == "none":
            problems.append(f"{where}: {node.op} takes no `adapter`")
        elif node.adapter not in {x.name for x in spec.nodes}:
            problems.append(f"{where}: adapter {node.adapter!r} is not a node (a train node)")
        elif node.adapter == node.name:
            problems.append(f"{where}: reads its own adapter")
    try:
        parse_params(kind, node.params)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
    return problems


def find_cycle(spec: WorkflowSpec) -> list[str] | None:
    """A cycle among nodes as a path that returns to its start, or None.

    Iterative depth-first search: a spec is untrusted input, and a recursive walk of a
    long chain would hit Python's recursion limit instead of giving an answer."""
    edges = {n.name: [i for i in _parents(n) if i not in spec.datasets] for n in spec.nodes}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in edges:
        if state.get(root) is not None:
            continue
        path: list[str] = [root]
        todo: list[list[str]] = [list(edges[root])]  # per path entry: edges left to follow
        state[root] = 1
        while path:
            if not todo[-1]:
                state[path.pop()] = 2
                todo.pop()
                continue
            nxt = todo[-1].pop(0)
            if state.get(nxt) == 1:
                return list(reversed([*path[path.index(nxt) :], nxt]))
            if state.get(nxt) is None and nxt in edges:
                state[nxt] = 1
                path.append(nxt)
                todo.append(list(edges[nxt]))
    return None


def _parents(node: NodeSpec) -> list[str]:
    """The nodes a node waits for: its inputs, and the node that trains its adapter."""
    return [*node.inputs, *([node.adapter] if node.adapter else [])]


def topo_order(spec: WorkflowSpec) -> list[str]:
    order: list[str] = []
    done: set[str] = set(spec.datasets)
    pending = {n.name: n for n in spec.nodes}
    while pending:
        ready = [name for name, n in pending.items() if all(i in done for i in _parents(n))]
        if not ready:
            raise SpecError(["cycle among nodes: " + ", ".join(sorted(pending))])
        for name in ready:
            order.append(name)
            done.add(name)
            del pending[name]
    return order
