"""Pure functions over the lineage's wire types (topics/api.py): which operators and
datasets are upstream of an operator, and a paged lineage assembled into one graph. The
engine links with them when it builds a graph or a page; a client, engine or not,
assembles pages with them.

An operator's `upstream` lists operator keys and ``dataset:<name>``. A page names the
operators upstream only where finding them is cheap (see engine/lineage/queries.py); where
it is not, it names the node, ``node:<name>``, and assembling every page replaces that
with the operators, exactly as a graph built in one piece has them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping

import msgspec

from flowmesh.topics.api import LINEAGE_PAGE, Lineage, LineageCursor, LineageNode, LineageOp
from flowmesh.topics.operators import KINDS

DATASET_PREFIX = "dataset:"
NODE_PREFIX = "node:"  # some operators of that node, not named in this page


def fanout(kind: str) -> str:
    k = KINDS.get(kind)
    return k.fanout if k is not None else "record"


def upstream_of(
    op: LineageOp,
    node: LineageNode,
    dataset_records: Mapping[str, Collection[str]],
    node_ops: Mapping[str, list[str]],
    producers: Mapping[str, Mapping[str, list[str]]],
    partial: Collection[str] = (),
) -> list[str]:
    """The operators and datasets an operator of `node` read. Record-fanout operators:
    the dataset holding its input record, or the operators of an input node whose output
    holds it (`producers[name]`: output digest -> operator keys). Whole-dataset ones
    (group, join): every operator of each input node (`node_ops[name]`). The input nodes
    in `partial` were not (all) read: what is not found there is named ``node:<name>``."""
    up: list[str] = []
    whole = fanout(op.kind or node.kind) == "all"
    for name in node.inputs:
        if name in dataset_records:
            if whole or any(d in dataset_records[name] for d in op.inputs):
                up.append(DATASET_PREFIX + name)
        elif whole:
            if name in node_ops:
                up.extend(node_ops[name])
            elif name in partial:
                up.append(NODE_PREFIX + name)
        else:
            index = producers.get(name, {})
            for digest in op.inputs:
                found = index.get(digest)
                if found is not None:
                    up.extend(found)
                elif name in partial:
                    up.append(NODE_PREFIX + name)
    return list(dict.fromkeys(up))


def producers_of(
    nodes: list[LineageNode], ops: Mapping[str, LineageOp]
) -> dict[str, dict[str, list[str]]]:
    """For each node: output record digest -> the keys of its operators that output it."""
    out: dict[str, dict[str, list[str]]] = {}
    for x in nodes:
        index: dict[str, list[str]] = {}
        for k in x.ops:
            if k in ops:
                for d in ops[k].outputs:
                    index.setdefault(d, []).append(k)
        out[x.name] = index
    return out


async def collect_pages(
    fetch: Callable[[LineageCursor | None, int], Awaitable[Lineage]], per_node: int = 0
) -> Lineage:
    """A lineage fetched a page at a time (`fetch(cursor, limit)`) as one graph: every
    operator, or (per_node > 0) the first `per_node` operators of each node."""
    pages = [await fetch(None, per_node or LINEAGE_PAGE)]
    if per_node:
        for n in pages[0].nodes[1:]:
            pages.append(await fetch(LineageCursor(node=n.name), per_node))
        return merge_pages(pages, complete=False)
    seen: set[tuple[str, int]] = set()
    while (cursor := pages[-1].next_page) is not None:
        if (cursor.node, cursor.offset) in seen:
            raise ValueError(f"lineage pages repeat at {cursor.node}:{cursor.offset}")
        seen.add((cursor.node, cursor.offset))
        pages.append(await fetch(cursor, LINEAGE_PAGE))
    return merge_pages(pages)


def merge_pages(pages: list[Lineage], complete: bool = True) -> Lineage:
    """Pages of one lineage (in the order they came) as one graph: each node's operators
    in slot order. When the pages hold every operator (`complete`), ``node:<name>``
    references are replaced by the operators of that node that output the record (every
    operator of it, for group and join)."""
    if not pages:
        raise ValueError("no pages to merge")
    first = pages[0]
    keys: dict[str, list[str]] = {n.name: [] for n in first.nodes}
    # each node's header from the page that listed its operators (it knows their kind
    # and version); the first page's otherwise
    headers = {n.name: n for n in first.nodes}
    listed: set[str] = set()
    ops: dict[str, LineageOp] = {}
    warnings: list[str] = []
    for page in pages:
        for n in page.nodes:
            keys.setdefault(n.name, []).extend(n.ops)
            if (n.ops or n.n_ops) and n.name not in listed:
                headers[n.name] = n
                listed.add(n.name)
        for k, op in page.ops.items():
            ops.setdefault(k, op)
        warnings.extend(w for w in page.warnings if w not in warnings)
    nodes = []
    for n in (headers[x.name] for x in first.nodes):
        own = list(dict.fromkeys(keys[n.name]))
        nodes.append(msgspec.structs.replace(n, ops=own, n_ops=max(n.n_ops, len(own))))
    by_name = {n.name: n for n in nodes}
    node_ops = {n.name: n.ops for n in nodes}
    producers = producers_of(nodes, ops)
    no_records: dict[str, Collection[str]] = {d.name: () for d in first.datasets}
    for k, op in ops.items():
        if not complete or not any(ref.startswith(NODE_PREFIX) for ref in op.upstream):
            continue
        node = by_name.get(op.node)
        if node is None:
            continue
        found = upstream_of(op, node, no_records, node_ops, producers)
        kept = [r for r in op.upstream if r.startswith(DATASET_PREFIX)]
        ops[k] = msgspec.structs.replace(op, upstream=list(dict.fromkeys(kept + found)))
    return msgspec.structs.replace(
        first, nodes=nodes, ops=ops, warnings=warnings, paged=False, next_page=None
    )
