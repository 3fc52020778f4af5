"""`build_lineage`: a workflow's lineage graph from what the bus and the CAS hold (see
the package's docstring for how operators are linked and what a partial graph shows)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from flowmesh.engine.lineage import reads
from flowmesh.engine.lineage.model import (
    Lineage,
    LineageDataset,
    LineageError,
    LineageNode,
    LineageOp,
)
from flowmesh.topics import Bus, codec
from flowmesh.topics.lineage import fanout, producers_of, upstream_of
from flowmesh.topics.messages import (
    NodeSpec,
    NodeStatus,
    OpRequest,
    OpResult,
    OpState,
    WorkflowStatus,
)
from flowmesh.topics.store.cas import CAS, CASError

CONCURRENCY = 64  # KV/CAS reads in flight at once


class HasBusAndCas(Protocol):
    """A FlowMesh client, or anything else holding a bus and a CAS."""

    @property
    def bus(self) -> Bus: ...

    @property
    def cas(self) -> CAS: ...


async def status_with_node(bus: Bus, workflow_id: str, node: str | None) -> WorkflowStatus:
    """The workflow's status, which must exist and (with `node`) hold that node: the
    first check of every lineage read, whole or a page at a time."""
    status = await reads.workflow_status(bus, workflow_id)
    if status is None:
        raise LineageError(f"no workflow {workflow_id!r}")
    if node is not None and node not in status.nodes:
        raise LineageError(
            f"workflow {workflow_id} has no node {node!r} (nodes: {', '.join(status.nodes)})"
        )
    return status


async def build_lineage(fm: HasBusAndCas, workflow_id: str, node: str | None = None) -> Lineage:
    """The lineage of a workflow, or (with `node`) of that node and all its ancestors."""
    bus, cas = fm.bus, fm.cas
    status = await status_with_node(bus, workflow_id, node)
    warnings: list[str] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def manifest(digest: str | None, what: str) -> list[str] | None:
        if digest is None:
            return None
        try:
            async with sem:
                return await cas.get_manifest(digest)
        except CASError as exc:
            warnings.append(f"{what}: manifest {digest[:12]} unreadable ({exc})")
            return None

    # the status carries each node's spec; older statuses don't, and then the
    # submission (if still in its stream) says which node feeds which
    node_specs = {n: ns.spec for n, ns in status.nodes.items() if ns.spec is not None}
    if len(node_specs) < len(status.nodes):
        spec = await reads.submitted_spec(bus, status.workflow_id, status.submitted_at)
        if spec is not None:
            node_specs = {**{n.name: n for n in spec.nodes}, **node_specs}

    datasets = await source_datasets(status, cas, manifest, warnings)

    # each node's operator keys (slot order) and ordered outputs; for one node, only
    # what can be its ancestor (status.nodes is in topological order)
    names = list(status.nodes)
    if node is not None:
        names = names[: names.index(node) + 1]
        if len(node_specs) == len(status.nodes):
            wanted = ancestors(node, {n: list(x.inputs) for n, x in node_specs.items()})
            names = [n for n in names if n in wanted]
    slot_keys: dict[str, list[str]] = {}
    node_outputs: dict[str, list[str] | None] = {}
    notes: dict[str, str] = {}
    ops_lists = await asyncio.gather(
        *(manifest(status.nodes[n].ops, f"node {n!r} operators") for n in names)
    )
    out_lists = await asyncio.gather(
        *(manifest(status.nodes[n].output, f"node {n!r} output") for n in names)
    )
    own_requests: dict[str, list[OpRequest]] | None = None
    for n, keys, outs in zip(names, ops_lists, out_lists, strict=True):
        ns = status.nodes[n]
        node_outputs[n] = outs
        if ns.complete:
            slot_keys[n] = keys or []
            if keys is None and ns.ops is not None:
                notes[n] = "its operator manifest is no longer in the CAS"
            continue
        if status.state == "failed":
            # the failure's lineage: what this workflow ran of the nodes it did not finish
            if own_requests is None:
                own_requests = await reads.requests_of_workflow(bus, status.workflow_id)
            slot_keys[n] = [r.key for r in own_requests.get(n, [])]
            notes[n] = "not complete (the workflow failed): the operators it had started"
        else:
            slot_keys[n] = []
            notes[n] = f"not complete yet ({ns.done}/{ns.total} operators done): not shown"

    # operator states and requests
    first_node: dict[str, str] = {}
    for n in names:
        for k in slot_keys[n]:
            first_node.setdefault(k, n)
    all_keys = list(first_node)

    async def op_state(key: str) -> OpState | None:
        async with sem:
            return await reads.op_state(bus, key)

    states = dict(
        zip(all_keys, await asyncio.gather(*(op_state(k) for k in all_keys)), strict=True)
    )
    requests = await reads.requests_of_ops(bus, all_keys, states, status.workflow_id, first_node)

    async def outputs_of(st: OpState) -> list[str]:
        if st.outputs is not None:
            return list(st.outputs)
        got = await manifest(st.output, f"operator {st.key[:12]} output")
        return got or []

    op_outputs = dict(
        zip(
            all_keys,
            await asyncio.gather(
                *(
                    outputs_of(st) if st is not None and st.state == "done" else _empty()
                    for st in states.values()
                )
            ),
            strict=True,
        )
    )

    # which node feeds which
    edges: dict[str, list[str]] = {}
    inferred: set[str] = set()
    for i, n in enumerate(names):
        if n in node_specs:
            edges[n] = list(node_specs[n].inputs)
        else:
            edges[n] = _infer_inputs(
                [states[k] for k in slot_keys[n]],
                [(d.name, d.manifest, d.records) for d in datasets.values()]
                + [(m, status.nodes[m].output, node_outputs[m]) for m in names[:i]],
            )
            inferred.add(n)

    # the graph
    ops: dict[str, LineageOp] = {}
    nodes: list[LineageNode] = []
    for n in names:
        ns = status.nodes[n]
        nspec = node_specs.get(n)
        keys = slot_keys[n]
        kind, executor, params, model = node_identity(nspec, [states[k] for k in keys])
        for slot, key in enumerate(keys):
            if key in ops:
                continue
            st = states[key]
            reqs = requests.get(key, [])
            if st is not None:
                ops[key] = op_lineage(key, n, st, op_outputs[key], reqs)
                continue
            ops[key] = LineageOp(
                key=key,
                node=n,
                state="invalidated",
                kind=kind,
                executor=executor,
                params=params,
                model=model,
                inputs=recover_inputs(
                    kind, slot, len(keys), edges[n], datasets, status.nodes, node_outputs
                ),
                requests=reqs,
                shared=is_shared(reqs),
            )
        nodes.append(
            LineageNode(
                name=n,
                kind=kind,
                executor=executor,
                params=params,
                inputs=edges[n],
                inputs_inferred=n in inferred,
                complete=ns.complete,
                total=ns.total,
                done=ns.done,
                failed=ns.failed,
                reused=ns.reused,
                output=ns.output,
                n_outputs=ns.n_outputs,
                ops=list(dict.fromkeys(keys)),
                n_ops=len(dict.fromkeys(keys)),
                model=model,
                note=notes.get(n),
            )
        )
    for key, up in _link(nodes, ops, datasets).items():
        ops[key] = msgspec.structs.replace(ops[key], upstream=up)

    if node is not None:
        keep = ancestors(node, edges)
        nodes = [x for x in nodes if x.name in keep]
        datasets = {k: v for k, v in datasets.items() if k in keep}
        kept_ops = {k for x in nodes for k in x.ops}
        ops = {k: v for k, v in ops.items() if k in kept_ops}
    if inferred:
        warnings.append(
            "the workflow's submission is no longer on the bus: node edges were inferred "
            "from digests"
        )
    return lineage_of(status, node, list(datasets.values()), nodes, ops, warnings)


def lineage_of(
    status: WorkflowStatus,
    target: str | None,
    datasets: list[LineageDataset],
    nodes: list[LineageNode],
    ops: dict[str, LineageOp],
    warnings: list[str],
    paged: bool = False,
) -> Lineage:
    """A workflow's lineage: its status's identity and outcome, and the graph read for
    it (whole, or a page of one node)."""
    return Lineage(
        workflow_id=status.workflow_id,
        name=status.name,
        tenant=status.tenant,
        state=status.state,
        dedup_scope=status.dedup_scope,
        submitted_at=status.submitted_at,
        ended_at=status.ended_at,
        error=status.error,
        target=target,
        partial=any(not x.complete for x in nodes),
        datasets=datasets,
        nodes=nodes,
        ops=ops,
        warnings=warnings,
        paged=paged,
    )


Manifest = Callable[[str | None, str], Awaitable[list[str] | None]]


async def source_datasets(
    status: WorkflowStatus,
    cas: CAS,
    manifest: Manifest,
    warnings: list[str],
    keep: set[str] | None = None,
) -> dict[str, LineageDataset]:
    """The workflow's source datasets (those in `keep`, when given), with their records."""
    datasets: dict[str, LineageDataset] = {}
    for name in dict.fromkeys([*status.datasets, *status.tables]):
        if keep is not None and name not in keep:
            continue
        m, table = status.datasets.get(name), status.tables.get(name)
        recs = await manifest(m, f"dataset {name!r}")
        if m is None and table is not None:
            # a workflow that failed before its dataset was recorded: the record digests
            # are those of the submitted table's rows, as the planner stored them
            recs = await table_records(cas, table, warnings)
            m = codec.digest_of(recs) if recs is not None else None
        datasets[name] = LineageDataset(
            name=name,
            manifest=m or "",
            table=table,
            records=recs or [],
            readable=recs is not None,
            n_records=len(recs or []),
        )
    return datasets


async def table_records(cas: CAS, table: str, warnings: list[str]) -> list[str] | None:
    try:
        rows = await cas.get_table(table)
    except CASError as exc:
        warnings.append(f"dataset table {table[:12]} unreadable ({exc})")
        return None
    return [codec.digest_of(r) for r in rows]


async def _empty() -> list[str]:
    return []


def is_shared(requests: list[OpRequest]) -> bool:
    return len({r.workflow_id for r in requests}) > 1


def op_lineage(
    key: str, node: str, st: OpState, outputs: list[str], requests: list[OpRequest]
) -> LineageOp:
    result = {f: getattr(st, f) for f in OpResult.__struct_fields__}
    result["outputs"] = outputs
    return LineageOp(
        key=key,
        node=node,
        state=st.state,
        kind=st.spec.kind,
        executor=st.spec.executor,
        version=st.spec.version,
        params=dict(st.spec.params),
        model=st.spec.model,
        inputs=list(st.spec.inputs),
        batch_size=st.batch_size,
        device_seconds=st.device_seconds,
        cost_usd=st.cost_usd,
        energy_j=st.energy_j,
        created_by=st.workflow_id,
        created_at=st.created_at,
        requests=requests,
        shared=is_shared(requests),
        **result,
    )


def node_identity(
    nspec: NodeSpec | None, states: list[OpState | None]
) -> tuple[str, str, dict[str, Any], str | None]:
    """kind, executor, params and model of a node: from its operators, else its spec."""
    for st in states:
        if st is not None:
            return st.spec.kind, st.spec.executor, dict(st.spec.params), st.spec.model
    if nspec is not None:
        executor = f"{nspec.op}.{nspec.fn}" if nspec.fn else nspec.op
        return nspec.op, executor, dict(nspec.params), nspec.model
    return "", "", {}, None


def recover_inputs(
    kind: str,
    slot: int,
    n_slots: int,
    inputs: list[str],
    datasets: dict[str, LineageDataset],
    nodes: dict[str, NodeStatus],
    node_outputs: dict[str, list[str] | None],
) -> list[str]:
    """The inputs of an operator whose KV entry is gone, from its slot: a record-fanout
    node's slots are its input node's output records, in order."""
    if fanout(kind) == "all":
        out = []
        for name in inputs:
            m = datasets[name].manifest if name in datasets else nodes[name].output
            if not m:
                return []
            out.append(m)
        return out
    if len(inputs) != 1:
        return []
    src = inputs[0]
    recs = datasets[src].records if src in datasets else node_outputs.get(src)
    if recs is None or len(recs) != n_slots:
        return []
    return [recs[slot]]


def _infer_inputs(
    states: list[OpState | None], earlier: list[tuple[str, str | None, list[str] | None]]
) -> list[str]:
    """Which of the earlier datasets/nodes fed a node, from digests alone. `earlier` is
    (name, output manifest, ordered output records) in topological order; on a tie the
    nearest one wins (a filter that kept every record looks like its input)."""
    known = [st for st in states if st is not None]
    if not known:
        return []
    if known[0].spec.fanout == "all":
        out = []
        for digest in known[0].spec.inputs:
            match = [name for name, m, _ in earlier if m == digest]
            out.append(match[-1] if match else "?")
        return out
    seq = [st.spec.inputs[0] if st is not None and st.spec.inputs else None for st in states]
    wanted = {d for d in seq if d is not None}
    exact, containing = [], []
    for name, _, recs in earlier:
        if recs is None:
            continue
        if len(recs) == len(seq) and all(d is None or d == r for d, r in zip(seq, recs)):  # noqa: B905
            exact.append(name)
        elif wanted <= set(recs):
            containing.append(name)
    if exact:
        return [exact[-1]]
    return [containing[-1]] if containing else []


def _link(
    nodes: list[LineageNode], ops: dict[str, LineageOp], datasets: dict[str, LineageDataset]
) -> dict[str, list[str]]:
    """Each operator's `upstream`, from its inputs and its node's input nodes."""
    records = {name: set(d.records) for name, d in datasets.items()}
    node_ops = {x.name: x.ops for x in nodes}
    producers = producers_of(nodes, ops)
    out: dict[str, list[str]] = {}
    for x in nodes:
        for k in x.ops:
            op = ops[k]
            if op.node == x.name and k not in out:
                out[k] = upstream_of(op, x, records, node_ops, producers)
    return out


def ancestors(node: str, edges: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(edges.get(n, []))
    return seen
