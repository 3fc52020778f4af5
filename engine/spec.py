"""Workflow specs: loading from YAML and validation with clear errors.

Validation runs twice: in the client before anything is published, and in the planner on
receipt (a submission is untrusted input). It reports every problem at once, in time linear
in the size of the spec, and refuses what would make a shared engine work without bound:
the limits below are documented in the README ("Limits").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from flowmesh.topics import codec
from flowmesh.topics.errors import FlowMeshError
from flowmesh.topics.messages import DatasetSpec, NodeSpec, WorkflowSpec
from flowmesh.topics.operators import (
    KINDS,
    MAX_TRAIN_BATCH,
    MAX_TRAIN_STEPS,
    executor_id,
    parse_params,
)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# What one submission may hold. Each bounds work the engine does on a tenant's behalf on
# its one event loop (a record nested 900 deep took it 26 s and 2.7 GB to convert).
MAX_NODES = 500  # nodes per workflow
MAX_DEPTH = 32  # nesting of lists and objects inside one record
MAX_RECORD_BYTES = 256 * 1024  # one record, as JSON
MAX_DATASET_RECORDS = 100_000  # records per dataset
MAX_DATASET_BYTES = 64 * 1024 * 1024  # one dataset, as JSON
MAX_OPERATORS = 1_000_000  # source records x nodes: the operators a submission can start
MAX_PARAMS_BYTES = 64 * 1024  # one node's params, as JSON


class Catalog(NamedTuple):
    """What the workers advertise, for the checks only they can answer: executor ids,
    model names, and each transform's parameters (name -> type name, required)."""

    executors: frozenset[str]
    models: frozenset[str]
    signatures: Mapping[str, Mapping[str, tuple[str, bool]]]


class SpecError(FlowMeshError, ValueError):
    """A workflow spec is invalid; `problems` lists every reason."""

    code = "bad_request"

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


def validate(
    spec: WorkflowSpec, catalog: Catalog | None = None, *, check_data: bool = True
) -> None:
    """Every problem of `spec` at once as one SpecError; `catalog` adds the checks against
    what workers run (unknown fns and models, transform parameters). `check_data=False`
    leaves out the inline records (a caller that checked them already, a chunk at a time:
    check_datasets)."""
    problems: list[str] = []
    if not spec.name.strip():
        problems.append("workflow `name` is empty")
    if not NAME_RE.match(spec.tenant):
        problems.append(f"tenant {spec.tenant!r} must match {NAME_RE.pattern}")
    if not spec.nodes:
        problems.append("workflow has no nodes")
    if len(spec.nodes) > MAX_NODES:
        # past this the other checks would only add work: say this one thing
        raise SpecError([f"workflow has {len(spec.nodes)} nodes; the limit is {MAX_NODES}"])

    for name, ds in spec.datasets.items():
        if not NAME_RE.match(name):
            problems.append(f"dataset name {name!r} must match {NAME_RE.pattern}")
        given = [x for x in (ds.path, ds.records, ds.digest) if x is not None]
        if len(given) != 1:
            problems.append(f"dataset {name!r}: give exactly one of path, records, digest")
        if ds.digest is not None and not codec.is_digest(ds.digest):
            problems.append(f"dataset {name!r}: digest is not a sha256 hex digest")
        if ds.records is not None and check_data:
            problems.extend(check_records(name, ds.records))
    if planned_operators(spec) > MAX_OPERATORS:
        problems.append(
            f"{planned_operators(spec)} operators (source records x nodes) is more than "
            f"{MAX_OPERATORS}; split the workflow"
        )

    names = {n.name for n in spec.nodes}
    ops = {n.name: n.op for n in spec.nodes}
    sources = names | set(spec.datasets)
    seen: set[str] = set()
    for node in spec.nodes:
        if not NAME_RE.match(node.name):
            problems.append(f"node name {node.name!r} must match {NAME_RE.pattern}")
        if node.name in seen:
            problems.append(f"node {node.name!r} is defined twice")
        if node.name in spec.datasets:
            problems.append(f"node {node.name!r} has the same name as a dataset")
        seen.add(node.name)
        problems.extend(_check_node(node, sources, ops))
        if catalog is not None:
            problems.extend(_check_catalog(node, catalog))

    cycle = find_cycle(spec)
    if cycle:
        problems.append("cycle: " + " -> ".join(cycle))
    if problems:
        raise SpecError(problems)


def planned_operators(spec: WorkflowSpec) -> int:
    """The operators a submission can start, as the MAX_OPERATORS check counts them."""
    records = sum(len(ds.records) for ds in spec.datasets.values() if ds.records is not None)
    return max(records, 1) * max(len(spec.nodes), 1)


async def check_datasets(spec: WorkflowSpec, chunk: int = 1000) -> None:
    """check_records for every inline dataset, yielding to the event loop between chunks
    of records: 60k records take ~0.1-0.4 s to check, which on a shared loop (the
    gateway's) would hold every other tenant's request that long. SpecError if any."""
    import asyncio

    problems: list[str] = []
    for name, ds in spec.datasets.items():
        records = ds.records or []
        if len(records) > MAX_DATASET_RECORDS:
            where = f"dataset {name!r}"
            problems.append(f"{where}: {len(records)} records; the limit is {MAX_DATASET_RECORDS}")
            continue
        total = 0
        for start in range(0, len(records), chunk):
            found, size = _check_chunk(name, records[start : start + chunk], start, total)
            total += size
            if found:
                problems.extend(found)
                break
            await asyncio.sleep(0)
    if problems:
        raise SpecError(problems)


def check_records(dataset: str, records: list[Any]) -> list[str]:
    """The limits on a dataset's records: count, nesting depth, size. Walked iteratively
    and stopped at the first excess, so a hostile record costs no more than the limit."""
    if len(records) > MAX_DATASET_RECORDS:
        return [f"dataset {dataset!r}: {len(records)} records; the limit is {MAX_DATASET_RECORDS}"]
    return _check_chunk(dataset, records, 0, 0)[0]


def _check_chunk(dataset: str, records: list[Any], first: int, total: int) -> tuple[list[str], int]:
    """(problems, bytes) of records[first:], `total` bytes counted before them."""
    where = f"dataset {dataset!r}"
    size = 0
    for i, record in enumerate(records, start=first):
        if not isinstance(record, dict):
            return [
                f"{where}: record {i} is {type(record).__name__}; every record is a mapping"
            ], size
        deep = [f"{where}: record {i} is nested deeper than {MAX_DEPTH} levels"]
        try:
            encoded = codec.encode(record)
        except (RecursionError, ValueError, TypeError):
            return deep, size  # msgspec's own nesting limit, well past ours
        # fewer brackets than the limit cannot nest deeper than it: only records with
        # many are walked (two counts at C speed instead of a Python walk per record)
        brackets = encoded.count(b"{") + encoded.count(b"[")
        if brackets > MAX_DEPTH and nesting_depth(record, MAX_DEPTH) > MAX_DEPTH:
            return deep, size
        if len(encoded) > MAX_RECORD_BYTES:
            limit = MAX_RECORD_BYTES
            return [f"{where}: record {i} is {len(encoded)} bytes; the limit is {limit}"], size
        size += len(encoded)
        if total + size > MAX_DATASET_BYTES:
            return [f"{where}: more than {MAX_DATASET_BYTES} bytes; the limit is that"], size
    return [], size


def nesting_depth(value: Any, limit: int) -> int:
    """How deep lists and dicts nest in `value` (a scalar is 0), counted up to limit + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((c, depth) for c in children if isinstance(c, dict | list | tuple))
    return deepest


def _check_node(node: NodeSpec, sources: set[str], ops: Mapping[str, str]) -> list[str]:
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
    for inp in node.inputs:
        if inp not in sources:
            problems.append(f"{where}: missing input {inp!r} (no dataset or node of that name)")
        if inp == node.name:
            problems.append(f"{where}: reads its own output")
    if kind.needs_fn and not node.fn:
        problems.append(f"{where}: {node.op} needs `fn`, the name of a registered transform")
    if not kind.needs_fn and node.fn:
        problems.append(f"{where}: {node.op} takes no `fn`")
    if node.fn is not None and not FN_RE.match(node.fn):
        problems.append(f"{where}: fn {node.fn!r} is not a valid transform name")
    if kind.model == "required" and not node.model:
        problems.append(f"{where}: {node.op} needs `model`")
    if kind.model == "none" and node.model:
        problems.append(f"{where}: {node.op} takes no `model`")
    if node.adapter is not None:
        if kind.model == "none":
            problems.append(f"{where}: {node.op} takes no `adapter`")
        elif node.adapter == node.name:
            problems.append(f"{where}: reads its own adapter")
        elif ops.get(node.adapter) != "train":
            # only a train node's output is loaded as an adapter: any other node would let
            # a record name a blob (`adapter: <digest>`) and probe what the CAS holds
            problems.append(f"{where}: adapter {node.adapter!r} is not a train node")
    if node.op == "train":
        steps, batch = node.params.get("steps", 0), node.params.get("batch_size", 0)
        if isinstance(steps, int) and steps > MAX_TRAIN_STEPS:
            problems.append(f"{where}: steps {steps} > {MAX_TRAIN_STEPS}, one train's limit")
        if isinstance(batch, int) and batch > MAX_TRAIN_BATCH:
            problems.append(f"{where}: batch_size {batch} > {MAX_TRAIN_BATCH}, the limit")
    if len(codec.encode(node.params)) > MAX_PARAMS_BYTES:
        problems.append(f"{where}: params are larger than {MAX_PARAMS_BYTES} bytes")
    else:
        try:
            parse_params(kind, node.params)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


# JSON values a transform parameter annotated with each type accepts
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


def _check_catalog(node: NodeSpec, catalog: Catalog) -> list[str]:
    where = f"node {node.name!r}"
    kind = KINDS.get(node.op)
    if kind is None:
        return []
    problems = []
    ex = executor_id(kind.name, node.fn)
    if ex not in catalog.executors:
        prefix = node.op + "."
        fns = sorted(k[len(prefix) :] for k in catalog.executors if k.startswith(prefix))
        hint = f" (registered: {', '.join(fns)})" if fns else ""
        problems.append(f"{where}: no worker runs {ex}{hint}")
    if node.model and node.model not in catalog.models:
        known = ", ".join(sorted(catalog.models)) or "none"
        problems.append(f"{where}: unknown model {node.model!r} (known: {known})")
    signature = catalog.signatures.get(ex)
    if signature is not None:
        problems.extend(check_transform_params(where, node.fn or "", signature, node.params))
    return problems


def check_transform_params(
    where: str, fn: str, signature: Mapping[str, tuple[str, bool]], params: Mapping[str, Any]
) -> list[str]:
    """A transform's params against its typed signature: unknown and missing names, and
    values of the wrong JSON type (`min: "three"` for an int)."""
    problems = []
    shown = ", ".join(f"{n}: {t}" + ("" if req else " = ...") for n, (t, req) in signature.items())
    for name, value in params.items():
        if name not in signature:
            problems.append(f"{where}: {fn} takes no parameter {name!r} ({fn}({shown}))")
            continue
        typ = signature[name][0].removeprefix("Optional[").removesuffix("]")
        base = typ.split("[", 1)[0].split("|", 1)[0].strip()
        accepted = _JSON_TYPES.get(base)
        if accepted is None or (value is None and "None" in typ):
            continue  # Any, unions and the like: the transform checks at run time
        wrong = not isinstance(value, accepted) or (
            isinstance(value, bool) and base in ("int", "float")
        )
        if wrong:
            problems.append(
                f"{where}: {fn} parameter {name!r} is {base}, got {type(value).__name__} "
                f"{codec.encode(value)[:40].decode(errors='replace')}"
            )
    for name, (_, required) in signature.items():
        if required and name not in params:
            problems.append(f"{where}: {fn} needs parameter {name!r} ({fn}({shown}))")
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
    """Nodes in an order where each comes after its parents (Kahn's algorithm: linear in
    nodes and edges, and stable: among ready nodes, spec order)."""
    nodes = {n.name: n for n in spec.nodes}
    waiting = {name: 0 for name in nodes}
    children: dict[str, list[str]] = {name: [] for name in nodes}
    for n in spec.nodes:
        for p in _parents(n):
            if p in nodes:
                waiting[n.name] += 1
                children[p].append(n.name)
            elif p not in spec.datasets:
                raise SpecError([f"node {n.name!r}: missing input {p!r}"])
    order = [name for name, w in waiting.items() if w == 0]
    i = 0
    while i < len(order):
        for child in children[order[i]]:
            waiting[child] -= 1
            if waiting[child] == 0:
                order.append(child)
        i += 1
    if len(order) < len(nodes):
        stuck = sorted(name for name, w in waiting.items() if w > 0)
        raise SpecError(["cycle among nodes: " + ", ".join(stuck)])
    return order
