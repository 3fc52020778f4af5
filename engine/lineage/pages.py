"""A lineage a page at a time: every node's header, and up to `limit` operators of one
node from an offset, so what one request reads grows with the page, not the workflow.

A page reads the workflow's status, the source datasets' manifests, the page node's
operator manifest, and the KV entries and requests of the page's operators. Linking them
upstream costs more: for a record operator, the upstream operators whose output holds its
input record. An input node of at most LINK_ALL operators is read whole (exact); a larger
one is read in windows of slots around the page's own (a node's slots are its input's
output records in order, so for one-to-one nodes such as map the producers sit at the same
slots), at most LINK_READ_FACTOR x limit entries; inputs not found there are named
``node:<name>`` and `topics.lineage.merge_pages` links them once every page is in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec

from flowmesh.engine.lineage import reads
from flowmesh.engine.lineage.model import (
    Lineage,
    LineageError,
    LineageNode,
    LineageOp,
)
from flowmesh.engine.lineage.queries import (
    CONCURRENCY,
    HasBusAndCas,
    ancestors,
    is_shared,
    lineage_of,
    node_identity,
    op_lineage,
    recover_inputs,
    source_datasets,
    status_with_node,
)
from flowmesh.topics import codec
from flowmesh.topics.api import LINEAGE_PAGE, LineageCursor
from flowmesh.topics.lineage import fanout, upstream_of
from flowmesh.topics.messages import NodeSpec, OpState
from flowmesh.topics.store.cas import CASError

LINK_ALL = 2000  # an input node with at most this many operators is read whole to link
LINK_READ_FACTOR = 4  # otherwise at most this many x limit of its entries are read


async def build_lineage_page(
    fm: HasBusAndCas,
    workflow_id: str,
    node: str | None = None,
    page: LineageCursor | None = None,
    limit: int = LINEAGE_PAGE,
    max_bytes: int | None = None,
) -> Lineage:
    """One page of the lineage of a workflow (with `node`: of that node and its
    ancestors): up to `limit` operators of the node `page` names (None: the first), from
    its offset. With `max_bytes` the page is cut so that it encodes within that many
    bytes (at least one operator stays); `next_page` then starts after what was kept."""
    bus, cas = fm.bus, fm.cas
    limit = max(1, min(limit, LINEAGE_PAGE))
    status = await status_with_node(bus, workflow_id, node)
    warnings: list[str] = []
    sem = asyncio.Semaphore(CONCURRENCY)
    manifests: dict[str, list[str] | None] = {}

    async def manifest(digest: str | None, what: str) -> list[str] | None:
        if digest is None:
            return None
        if digest not in manifests:
            try:
                async with sem:
                    manifests[digest] = await cas.get_manifest(digest)
            except CASError as exc:
                warnings.append(f"{what}: manifest {digest[:12]} unreadable ({exc})")
                manifests[digest] = None
        return manifests[digest]

    specs: dict[str, NodeSpec] = {n: ns.spec for n, ns in status.nodes.items() if ns.spec}
    if len(specs) < len(status.nodes):
        spec = await reads.submitted_spec(bus, status.workflow_id, status.submitted_at)
        if spec is not None:
            specs = {**{n.name: n for n in spec.nodes}, **specs}
    edges = {n: list(x.inputs) for n, x in specs.items()}
    if len(specs) < len(status.nodes):
        warnings.append(
            "the workflow's submission is no longer on the bus: a page does not infer node "
            "edges (the whole lineage, build_lineage, does)"
        )

    names = list(status.nodes)
    keep: set[str] | None = None
    if node is not None:
        names = names[: names.index(node) + 1]
        if len(specs) == len(status.nodes):
            keep = ancestors(node, edges)
            names = [n for n in names if n in keep]
    where = page.node if page is not None else names[0]
    if where not in names:
        raise LineageError(f"workflow {workflow_id}: no node {where!r} in this lineage")
    offset = max(0, page.offset if page is not None else 0)

    # source datasets: headers for the page, records kept here to link and recover
    datasets = await source_datasets(status, cas, manifest, warnings, keep)

    # the page node's operators in slot order, and this page of them
    ns = status.nodes[where]
    note: str | None = None
    slots: list[str] = []
    if ns.complete:
        slots = await manifest(ns.ops, f"node {where!r} operators") or []
        if not slots and ns.ops is not None:
            note = "its operator manifest is no longer in the CAS"
    elif status.state == "failed":
        own = await reads.requests_of_workflow(bus, status.workflow_id)
        slots = [r.key for r in own.get(where, [])]
        note = "not complete (the workflow failed): the operators it had started"
    else:
        note = f"not complete yet ({ns.done}/{ns.total} operators done): not shown"
    first_slot: dict[str, int] = {}
    for i, k in enumerate(slots):
        first_slot.setdefault(k, i)
    distinct = list(first_slot)
    keys = distinct[offset : offset + limit]

    async def op_state(key: str) -> OpState | None:
        async with sem:
            return await reads.op_state(bus, key)

    async def outputs_of(st: OpState | None) -> list[str]:
        if st is None or st.state != "done":
            return []
        if st.outputs is not None:
            return list(st.outputs)
        return await manifest(st.output, f"operator {st.key[:12]} output") or []

    states = list(await asyncio.gather(*(op_state(k) for k in keys)))
    outputs = list(await asyncio.gather(*(outputs_of(st) for st in states)))
    found = dict(zip(keys, states, strict=True))
    nodes = dict.fromkeys(keys, where)
    requests = await reads.requests_of_ops(bus, keys, found, status.workflow_id, nodes)
    kind, executor, params, model = node_identity(specs.get(where), states)
    inputs = edges.get(where, [])
    node_outputs: dict[str, list[str] | None] = {}
    if any(st is None for st in states):  # invalidated: inputs recovered from the slot
        for name in inputs:
            if name in status.nodes:
                node_outputs[name] = await manifest(status.nodes[name].output, f"node {name!r}")
    ops: dict[str, LineageOp] = {}
    for key, st, outs in zip(keys, states, outputs, strict=True):
        reqs = requests.get(key, [])
        if st is not None:
            ops[key] = op_lineage(key, where, st, outs, reqs)
            continue
        slot = first_slot[key]
        ops[key] = LineageOp(
            key=key,
            node=where,
            state="invalidated",
            kind=kind,
            executor=executor,
            params=params,
            model=model,
            inputs=recover_inputs(
                kind, slot, len(slots), inputs, datasets, status.nodes, node_outputs
            ),
            requests=reqs,
            shared=is_shared(reqs),
        )

    headers: list[LineageNode] = []
    for n in names:
        x = status.nodes[n]
        if n == where:
            identity = (kind, executor, params, model)
        else:
            identity = node_identity(specs.get(n), [])
        headers.append(
            LineageNode(
                name=n,
                kind=identity[0],
                executor=identity[1],
                params=identity[2],
                inputs=edges.get(n, []),
                inputs_inferred=False,
                complete=x.complete,
                total=x.total,
                done=x.done,
                failed=x.failed,
                reused=x.reused,
                output=x.output,
                n_outputs=x.n_outputs,
                ops=list(keys) if n == where else [],
                n_ops=len(distinct) if n == where else 0,
                model=identity[3],
                note=note if n == where else _note(x.complete, status.state, x.done, x.total),
            )
        )

    # link the page's operators upstream
    here = headers[names.index(where)]
    partial: set[str] = set()
    node_ops: dict[str, list[str]] = {}
    producers: dict[str, dict[str, list[str]]] = {}
    whole = fanout(kind) == "all"
    wanted = {d for op in ops.values() for d in op.inputs}
    lo = min((first_slot[k] for k in keys), default=0)
    width = max((first_slot[k] for k in keys), default=0) - lo + 1
    for name in inputs:
        if name in datasets or name not in status.nodes:
            continue
        up_slots = await manifest(status.nodes[name].ops, f"node {name!r} operators") or []
        up_keys = list(dict.fromkeys(up_slots))
        if whole:
            if len(up_keys) <= LINK_ALL:
                node_ops[name] = up_keys
            else:
                partial.add(name)
            continue
        index, complete = await _producers(up_keys, wanted, lo, width, op_state, outputs_of)
        producers[name] = index
        if not complete:
            partial.add(name)
    records = {name: set(d.records) for name, d in datasets.items()}
    for key, op in ops.items():
        up = upstream_of(op, here, records, node_ops, producers, partial)
        ops[key] = msgspec.structs.replace(op, upstream=up)

    ds = [msgspec.structs.replace(d, records=[]) for d in datasets.values()]
    lin = lineage_of(status, node, ds, headers, ops, warnings, paged=True)
    if max_bytes is not None:
        # room for the next_page cursor, set below
        keys = _fit(lin, where, keys, max_bytes - 64 - max(len(n) for n in names))
    end = offset + len(keys)
    if end < len(distinct):
        lin.next_page = LineageCursor(node=where, offset=end)
    elif names.index(where) + 1 < len(names):
        lin.next_page = LineageCursor(node=names[names.index(where) + 1])
    return lin


def _note(complete: bool, state: str, done: int, total: int) -> str | None:
    if complete:
        return None
    if state == "failed":
        return "not complete (the workflow failed): the operators it had started"
    return f"not complete yet ({done}/{total} operators done): not shown"


async def _producers(
    up_keys: list[str],
    wanted: set[str],
    around: int,
    width: int,
    op_state: Callable[[str], Awaitable[OpState | None]],
    outputs_of: Callable[[OpState | None], Awaitable[list[str]]],
) -> tuple[dict[str, list[str]], bool]:
    """output digest -> operator keys of an input node, for the `wanted` digests; True
    when every wanted digest was found or every operator of the node was read."""
    read_all = len(up_keys) <= LINK_ALL
    budget = len(up_keys) if read_all else LINK_READ_FACTOR * max(width, 1)
    # windows in the order most likely to hold the producers: the page's own slots,
    # then after them (a filter drops records), then before (an op with several outputs)
    w = max(width, 1)
    if read_all:
        spans = [(0, len(up_keys))]
    else:
        spans = [(around + i * w, around + (i + 1) * w) for i in (0, 1, -1, 2, -2, 3)]
    index: dict[str, list[str]] = {}
    seen: set[int] = set()
    for a, b in spans:
        todo = [i for i in range(max(0, a), min(b, len(up_keys))) if i not in seen]
        todo = todo[: max(0, budget - len(seen))]
        if not todo:
            continue
        seen.update(todo)
        states = await asyncio.gather(*(op_state(up_keys[i]) for i in todo))
        outs = await asyncio.gather(*(outputs_of(st) for st in states))
        for i, got in zip(todo, outs, strict=True):
            for d in got:
                if d in wanted:
                    index.setdefault(d, []).append(up_keys[i])
        if wanted <= index.keys():
            break
    return index, read_all or wanted <= index.keys()


def _fit(lin: Lineage, where: str, keys: list[str], max_bytes: int) -> list[str]:
    """Cut the page's operators (from the end) until it encodes within max_bytes: by
    each operator's own size first, then checked on the whole."""
    node = next(x for x in lin.nodes if x.name == where)
    size = len(codec.encode(lin))
    while size > max_bytes and len(node.ops) > 1:
        gone = node.ops.pop()
        size -= len(codec.encode(lin.ops.pop(gone))) + 2 * len(gone) + 8
        if size <= max_bytes:
            size = len(codec.encode(lin))
    return list(node.ops)
