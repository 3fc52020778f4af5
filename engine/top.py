"""`flowmesh top`: a terminal dashboard of the fabric (rich), refreshed in place.

Streams and consumer lag, ready-pool depth per pool, workers with class, load and
resident models, batches in flight, dedup hit rate, and per-tenant throughput and $:
all from one `engine.monitor.Snapshot`, the same one the web console shows.
`--once` prints a single snapshot and exits (for scripts, CI logs and tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flowmesh.engine.cli_options import _run, connect_timeout, creds_option, nats_option
from flowmesh.engine.monitor import Snapshot, snapshot
from flowmesh.topics import Bus
from flowmesh.topics.config.creds import CredsError, resolve_url

STALE_S = 5.0  # a worker silent this long is shown as stale


def printable(text: str) -> str:
    """Text from tenants (workflow names) or the bus, fit for a terminal: rich markup
    escaped (`[/red]` is text, not a tag) and control characters shown as escapes, so a
    name cannot clear the screen or move the cursor."""
    shown = "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        for c in text
    )
    return escape(shown)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def render(snap: Snapshot, max_workflows: int = 15) -> RenderableType:
    d = snap.dedup
    head = Text.assemble(
        ("FlowMesh ", "bold"),
        f"{time.strftime('%H:%M:%S', time.localtime(snap.at))}  ",
        f"workers {len(snap.workers)}  ",
        f"workflows running {sum(w.state == 'running' for w in snap.workflows)}"
        f"/{len(snap.workflows)}  ",
        f"batches in flight {snap.batches_in_flight}  ",
        f"ready {sum(snap.ready_by_pool.values())} "
        f"({', '.join(f'{p}={n}' for p, n in sorted(snap.ready_by_pool.items())) or '-'})\n",
        f"dedup hit rate {d.hit_rate:.0%} ({d.joined} joined, {d.reused} reused of {d.requests})  ",
        f"spent ${snap.total_usd:.6f} {snap.total_energy_j / 1000:.3f} kJ",
    )

    st = Table(title="streams", title_justify="left", expand=False)
    for col in ("stream", "messages", "bytes", "consumers", "subjects"):
        st.add_column(col, justify="right" if col in ("messages", "bytes", "consumers") else "left")
    for s in snap.streams:
        subj = ", ".join(f"{k}={v}" for k, v in sorted(s.subjects.items())[:6])
        st.add_row(s.name, str(s.messages), _bytes(s.bytes), str(s.consumers), printable(subj))

    ct = Table(title="consumer lag", title_justify="left")
    for col in ("stream", "consumer", "pending", "ack pending", "redelivered"):
        ct.add_column(col, justify="left" if col in ("stream", "consumer") else "right")
    for c in snap.consumers:
        style = "yellow" if c.pending or c.ack_pending else ""
        ct.add_row(
            c.stream, c.name, str(c.pending), str(c.ack_pending), str(c.redelivered), style=style
        )

    wt = Table(title="workers", title_justify="left")
    for col in ("worker", "class", "load", "done", "resident models", "last batch", "$/h", "seen"):
        wt.add_column(col, justify="right" if col in ("done", "$/h", "seen") else "left")
    for wk in snap.workers:
        style = "red" if wk.stopping or wk.age_s > STALE_S else ""
        wt.add_row(
            printable(wk.worker),
            wk.device_class,
            f"{wk.in_flight}/{wk.slots}",
            str(wk.batches_done),
            printable(", ".join(wk.resident) or "-"),
            wk.last_batch or "-",
            f"{wk.price_per_hour:.2f}",
            f"{wk.age_s:.0f}s ago",
            style=style,
        )

    tt = Table(title="tenants", title_justify="left")
    for col in (
        "tenant",
        "workflows",
        "running",
        "ops",
        "ops/s (1 min)",
        "paid $",
        "saved $",
        "kJ",
    ):
        tt.add_column(col, justify="left" if col == "tenant" else "right")
    for t in snap.tenants:
        tt.add_row(
            printable(t.tenant),
            str(t.workflows),
            str(t.running),
            str(t.ops),
            f"{t.ops_per_s:.2f}",
            f"{t.paid_usd:.6f}",
            f"{t.saved_usd:.6f}",
            f"{t.paid_energy_j / 1000:.3f}",
        )

    ft = Table(title="workflows", title_justify="left")
    for col in ("workflow", "name", "tenant", "state", "ops done", "reused", "seconds", "$"):
        ft.add_column(
            col, justify="right" if col in ("ops done", "reused", "seconds", "$") else "left"
        )
    colours = {"running": "cyan", "completed": "green", "failed": "red"}
    for w in snap.workflows[:max_workflows]:
        ft.add_row(
            w.workflow_id,
            printable(w.name),
            printable(w.tenant),
            Text(w.state, style=colours.get(w.state, "")),
            f"{w.ops_done}/{w.ops_total}",
            str(w.ops_reused),
            f"{w.seconds:.1f}",
            f"{w.paid_usd:.6f}",
        )
    parts: list[RenderableType] = [head, st, ct, wt, tt, ft]
    if len(snap.workflows) > max_workflows:
        parts.append(Text(f"... and {len(snap.workflows) - max_workflows} more workflows"))
    if snap.errors:
        parts.append(Text("unreadable entries: " + "; ".join(snap.errors[:3]), style="red"))
    return Group(*parts)


async def _loop(nats_url: str, interval: float, once: bool, console: Console) -> None:
    bus = await Bus.connect(nats_url, "flowmesh-top", give_up_after=connect_timeout())
    try:
        if once or not console.is_terminal:
            # not a terminal (a pipe, a log file): a live view would write nothing there,
            # so one snapshot after another, each printed whole
            while True:
                console.print(render(await snapshot(bus)))
                if once:
                    return
                await asyncio.sleep(interval)
        with Live(console=console, screen=False, auto_refresh=False) as live:
            while True:
                live.update(render(await snapshot(bus)), refresh=True)
                await asyncio.sleep(interval)
    finally:
        await bus.close()


@click.command("top")
@nats_option
@click.option("--interval", default=2.0, show_default=True, help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one snapshot and exit")
@creds_option
def top_command(nats_url: str, interval: float, once: bool, creds_path: str) -> None:
    """Live dashboard: streams and lag, ready pools, workers, dedup, tenants' throughput and $."""
    try:
        nats_url = resolve_url(nats_url, creds_path)  # it reads every tenant's state
    except CredsError as exc:
        raise click.UsageError(str(exc)) from exc
    # piped (`--once > file`, CI logs): wide enough that ids are not cut to "wf-2758…"
    console = Console(width=None if sys.stdout.isatty() else 200)
    with contextlib.suppress(KeyboardInterrupt):
        _run(lambda: _loop(nats_url, max(0.2, interval), once, console))
