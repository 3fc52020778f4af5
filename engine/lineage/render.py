"""The lineage graph on a terminal: node by node, a table of operators each."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flowmesh.engine.lineage.model import DATASET_PREFIX, NODE_PREFIX, Lineage, LineageOp


def _short(digest: str | None, n: int = 10) -> str:
    return digest[:n] if digest else "-"


def _params(params: dict[str, Any], width: int = 60) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _upstream_label(lin: Lineage, op: LineageOp) -> str:
    if not op.upstream:
        return "?" if op.state != "pending" else "-"
    # an upstream operator not fetched (a page shows some of each node) is in the one
    # input node that is not a dataset, when there is one
    by_name = {n.name: n for n in lin.nodes}
    data = {d.name for d in lin.datasets}
    here = by_name.get(op.node)
    feeders = [n for n in (here.inputs if here else []) if n not in data]
    unknown = feeders[0] if len(feeders) == 1 else "?"
    groups: dict[str, list[str]] = {}
    for ref in op.upstream:
        if ref.startswith((DATASET_PREFIX, NODE_PREFIX)):
            groups.setdefault(ref, [])
        else:
            up = lin.ops.get(ref)
            groups.setdefault(up.node if up else unknown, []).append(ref)
    parts = []
    for group, refs in groups.items():
        if group.startswith(DATASET_PREFIX):
            parts.append(f"dataset {group[len(DATASET_PREFIX) :]}")
        elif group.startswith(NODE_PREFIX):
            parts.append(f"{group[len(NODE_PREFIX) :]} (not linked in this page)")
        elif len(refs) <= 2:
            parts.append(", ".join(f"{group}:{_short(r, 8)}" for r in refs))
        else:
            parts.append(f"{group} x{len(refs)}")
    return "; ".join(parts)


def _inputs_label(op: LineageOp) -> str:
    if not op.inputs:
        return "?"
    if len(op.inputs) == 1:
        return _short(op.inputs[0], 8)
    return f"{len(op.inputs)}: " + ",".join(_short(d, 6) for d in op.inputs[:2])


def _requested_by(lin: Lineage, op: LineageOp) -> str:
    if not op.requests:
        return "-"
    parts = []
    for r in op.requests:
        me = "*" if r.workflow_id == lin.workflow_id else ""
        parts.append(f"{r.workflow_id}{me}/{r.tenant} {r.role}")
    return "\n".join(parts)


def _duration(op: LineageOp) -> str:
    if not op.ended_at or not op.started_at:
        return "-"
    secs = op.ended_at - op.started_at
    return f"{secs * 1000:.0f} ms" if secs < 10 else f"{secs:.1f} s"


def render(lin: Lineage, console: Console, limit: int = 20) -> None:
    """The graph, node by node from the sources to the node asked for; at most `limit`
    operators per node (0: all)."""
    what = f"node {lin.target}" if lin.target else "all nodes"
    console.print(
        f"[bold]lineage of {escape(lin.workflow_id)}[/bold] ({escape(lin.name)}, "
        f"tenant {escape(lin.tenant)}, {lin.state}, dedup {lin.dedup_scope}): {escape(what)}"
    )
    if lin.partial:
        console.print(
            "[yellow]partial: the workflow "
            + ("is still running" if lin.state == "running" else "did not complete")
            + "; only operators of complete nodes (and finished ones) are shown[/yellow]"
        )
    for w in lin.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    for ds in lin.datasets:
        extra = "" if ds.readable else " [red](manifest no longer in the CAS)[/red]"
        n_records = max(ds.n_records, len(ds.records))  # a page leaves the records out
        console.print(
            f"[bold cyan]dataset {escape(ds.name)}[/bold cyan]: {n_records} records, "
            f"manifest {_short(ds.manifest, 12)}, table {_short(ds.table, 12)}{extra}"
        )
    for node in lin.nodes:
        ops = [lin.ops[k] for k in node.ops]
        n_ops = max(node.n_ops, len(ops))  # a page fetched some of them
        versions = sorted({o.version for o in ops if o.version})
        version = ",".join(v[:12] for v in versions) or "?"
        edge = ", ".join(node.inputs) or "?"
        if node.inputs_inferred:
            edge += " (inferred)"
        state = "complete" if node.complete else "[yellow]not complete[/yellow]"
        shared = sum(1 for o in ops if o.shared)
        invalid = sum(1 for o in ops if o.state == "invalidated")
        title = (
            f"[bold]{escape(node.name)}[/bold] ← {escape(edge)}   "
            f"{escape(node.executor)}@{escape(version)} {escape(_params(node.params))}"
        )
        if node.model:
            title += f" model {_short(node.model, 12)}"
        summary = (
            f"{n_ops} ops, {node.n_outputs} outputs, {state}; {shared} shared with other workflows"
        )
        if n_ops > len(ops):
            summary += f" (of the {len(ops)} fetched)"
        if invalid:
            summary += f", [red]{invalid} invalidated[/red]"
        console.print()
        console.print(title)
        console.print("  " + summary)
        if node.note:
            console.print(f"  [yellow]{escape(node.note)}[/yellow]")
        if not ops:
            continue
        shown = ops if limit <= 0 else ops[:limit]
        table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 1))
        for col in ("op", "state", "input", "← upstream", "output", "worker", "time", "att"):
            table.add_column(col, no_wrap=col not in ("← upstream",))
        table.add_column("requested by (* = this workflow)")
        for op in shown:
            state_txt = {
                "done": "done",
                "failed": "[red]failed[/red]",
                "invalidated": "[red]invalidated[/red]",
                "pending": "[yellow]pending[/yellow]",
            }[op.state]
            output = f"{_short(op.output, 8)} ({op.n_outputs})" if op.output else "-"
            worker = f"{op.worker} ({op.device_class})" if op.worker else "-"
            table.add_row(
                _short(op.key, 12),
                state_txt,
                _inputs_label(op),
                escape(_upstream_label(lin, op)),
                output,
                escape(worker),
                _duration(op),
                str(op.attempts or "-"),
                escape(_requested_by(lin, op)),
            )
        console.print(table)
        if n_ops > len(shown):
            console.print(f"  … and {n_ops - len(shown)} more ops (--limit 0 shows all)")
