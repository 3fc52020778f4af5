"""`flowmesh cache ls|stats|invalidate|gc`."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import click

from flowmesh.engine.cache.entries import CacheError, CacheStats, Selector, entries, stats
from flowmesh.engine.cache.gc import GcReport, gc
from flowmesh.engine.cache.invalidate import InvalidateResult, invalidate
from flowmesh.engine.cli_options import (
    _cas,
    _run,
    cas_option,
    connect_timeout,
    data_option,
    nats_option,
)
from flowmesh.topics import Bus, codec
from flowmesh.topics.messages import OpState
from flowmesh.topics.store.cas import CAS, CASError


@click.group("cache")
def cache_group() -> None:
    """Inspect and invalidate cached operator results; garbage-collect the CAS."""


def _key_options(f: Any) -> Any:
    for opt in reversed(
        [
            click.option("--key", default=None, help="operator key, or a prefix of one"),
            click.option("--kind", default=None, help="operator kind (map, filter, generate...)"),
            click.option("--executor", default=None, help="executor id, e.g. map.text.upper"),
            click.option("--version", default=None, help="executor version"),
        ]
    ):
        f = opt(f)
    return f


def _connect_and(
    nats_url: str, cas_url: str | None, fn: Any, need_cas: bool = False
) -> Awaitable[Any]:
    async def go() -> Any:
        bus = await Bus.connect(nats_url, name="flowmesh-cache", give_up_after=connect_timeout())
        try:
            if need_cas:
                from flowmesh.topics.store.cas import open_cas

                return await fn(bus, await open_cas(cas_url or "", bus.js))
            return await fn(bus)
        except (CASError, CacheError) as exc:  # _run prints these without a traceback
            raise RuntimeError(str(exc)) from exc
        finally:
            await bus.close()

    return go()


def _age(ts: float) -> str:
    secs = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if secs >= size:
            return f"{secs / size:.1f}{unit}"
    return f"{secs:.0f}s"


def _console() -> Any:
    from rich.console import Console

    return Console()


@cache_group.command("ls")
@nats_option
@data_option
@cas_option
@_key_options
@click.option(
    "--state", type=click.Choice(["pending", "done", "failed"]), default=None, help="entry state"
)
@click.option("--json", "as_json", is_flag=True, help="one JSON list of the full entries")
@click.option("--limit", default=50, show_default=True, help="newest N entries (0: all of them)")
def ls_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    key: str | None,
    kind: str | None,
    executor: str | None,
    version: str | None,
    state: str | None,
    as_json: bool,
    limit: int,
) -> None:
    """List cache entries (operator results), newest first."""

    async def fn(bus: Bus) -> list[OpState]:
        return await entries(
            bus, key=key, kind=kind, executor=executor, version=version, state=state
        )

    ops = _run(lambda: _connect_and(nats_url, cas_url, fn))
    total = len(ops)
    ops = list(reversed(ops))[: limit or None]
    if as_json:
        click.echo(json.dumps([codec.to_builtins(op) for op in ops]))
        return
    from rich.table import Table

    table = Table("key", "state", "kind", "executor@version", "workflow", "out", "device s", "age")
    for op in ops:
        table.add_row(
            op.key[:12],
            op.state,
            op.spec.kind,
            f"{op.spec.executor}@{op.spec.version}",
            op.workflow_id,
            str(op.n_outputs),
            f"{op.device_seconds:.3f}",
            _age(op.created_at),
        )
    _console().print(table)
    if total > len(ops):
        _console().print(f"{len(ops)} of {total} entries shown (--limit 0 for all)")


@cache_group.command("stats")
@nats_option
@data_option
@cas_option
@_key_options
@click.option(
    "--state",
    type=click.Choice(["pending", "done", "failed"]),
    default=None,
    help="count only entries in this state",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def stats_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    key: str | None,
    kind: str | None,
    executor: str | None,
    version: str | None,
    state: str | None,
    as_json: bool,
) -> None:
    """Entries per kind, executor@version and state; device time and cost they took."""

    async def fn(bus: Bus) -> CacheStats:
        return await stats(bus, key=key, kind=kind, executor=executor, version=version, state=state)

    st = _run(lambda: _connect_and(nats_url, cas_url, fn))
    if as_json:
        click.echo(json.dumps(asdict(st)))
        return
    from rich.table import Table

    table = Table(
        "kind",
        "executor@version",
        "entries",
        "done",
        "failed",
        "pending",
        "outputs",
        "device s",
        "cost $",
    )
    for r in st.rows:
        table.add_row(
            r.kind,
            f"{r.executor}@{r.version}",
            str(r.entries),
            str(r.done),
            str(r.failed),
            str(r.pending),
            str(r.outputs),
            f"{r.device_seconds:.3f}",
            f"{r.cost_usd:.6f}",
        )
    _console().print(table)
    _console().print(
        f"{st.entries} entries ({', '.join(f'{k} {v}' for k, v in sorted(st.by_state.items()))}"
        f"{'' if st.entries else 'none'}); {st.device_seconds:.3f} device seconds, "
        f"${st.cost_usd:.6f}, {st.energy_j:.1f} J"
    )


@cache_group.command("invalidate")
@nats_option
@data_option
@cas_option
@_key_options
@click.option(
    "--state",
    type=click.Choice(["done", "failed"]),
    default=None,
    help="only entries in this state (failed: let failed work be retried)",
)
@click.option("--all", "all_", is_flag=True, help="invalidate every entry (needs no selector)")
@click.option("--yes", "-y", is_flag=True, help="do not ask when several entries match")
def invalidate_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    key: str | None,
    kind: str | None,
    executor: str | None,
    version: str | None,
    state: Literal["done", "failed"] | None,
    all_: bool,
    yes: bool,
) -> None:
    """Forget cached results, so the next workflow that asks for that work runs it again.

    Results that workflows already recorded stay readable; blobs nothing refers to any
    more are removed later by `flowmesh cache gc`."""
    if Selector(key, kind, executor, version, state).empty() and not all_:
        raise click.UsageError(
            "give a selector (--key/--kind/--executor/--version/--state) or --all"
        )

    async def preview(bus: Bus) -> list[OpState]:
        return await entries(
            bus, key=key, kind=kind, executor=executor, version=version, state=state
        )

    matching = _run(lambda: _connect_and(nats_url, cas_url, preview))
    todo = [op for op in matching if op.state != "pending"]
    if not matching:
        click.echo("nothing matches")
        return
    if len(todo) > 1 and not yes:
        click.confirm(f"invalidate {len(todo)} cache entries?", abort=True, err=True)

    async def fn(bus: Bus) -> InvalidateResult:
        return await invalidate(
            bus,
            key=key,
            kind=kind,
            executor=executor,
            version=version,
            state=state,
            all=all_,
        )

    res = _run(lambda: _connect_and(nats_url, cas_url, fn))
    by_key = {op.key: op for op in matching}
    for k in res:
        op = by_key.get(k)
        what = f"{op.spec.executor}@{op.spec.version} {op.state}" if op else ""
        click.echo(f"invalidated {k} {what}".rstrip())
    for k in res.skipped_pending:
        click.echo(f"skipped {k} (pending: in flight)")
    for k in res.changed:
        click.echo(f"skipped {k} (changed while invalidating; run again)")
    click.echo(
        f"{len(res)} invalidated, {len(res.skipped_pending)} pending skipped"
        + (f", {len(res.changed)} changed" if res.changed else ""),
        err=True,
    )


@cache_group.command("gc")
@nats_option
@data_option
@cas_option
@click.option(
    "--grace",
    "grace_s",
    default=3600.0,
    show_default=True,
    type=float,
    help="keep unreferenced blobs younger than this many seconds (work in flight)",
)
@click.option("--dry-run", is_flag=True, help="report what would be deleted, delete nothing")
@click.option(
    "--invalidate-dangling",
    is_flag=True,
    help="also invalidate done cache entries whose results are gone from the CAS",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable report")
def gc_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    grace_s: float,
    dry_run: bool,
    invalidate_dangling: bool,
    as_json: bool,
) -> None:
    """Delete CAS blobs that no cache entry, workflow or model refers to any more."""
    url = _cas(cas_url, data_dir)

    async def fn(bus: Bus, cas: CAS) -> GcReport:
        return await gc(
            bus, cas, grace_s=grace_s, dry_run=dry_run, invalidate_dangling=invalidate_dangling
        )

    rep = _run(lambda: _connect_and(nats_url, url, fn, need_cas=True))
    if as_json:
        click.echo(json.dumps(asdict(rep)))
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{rep.blobs} blobs: {rep.kept} live, {verb} {rep.deleted} unreferenced, kept "
        f"{rep.young} unreferenced younger than {grace_s:g}s "
        f"({rep.live} digests reachable; {rep.seconds:.2f}s)"
    )
    for digest, where in sorted(rep.missing.items(), key=lambda kv: kv[1]):
        click.echo(f"missing {digest[:12]} referenced by {where}", err=True)
    for key in rep.dangling_ops:
        done = "invalidated" if key in rep.invalidated else "flowmesh cache invalidate --key"
        click.echo(f"dangling cache entry {key}: results gone from the CAS ({done})", err=True)
    for entry in rep.unreadable_entries:
        click.echo(f"unreadable KV entry {entry}", err=True)
