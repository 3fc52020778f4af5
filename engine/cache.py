"""The operator cache: look at it, invalidate parts of it, garbage-collect the CAS.

The cache *is* the operator KV (bucket fm_ops): one `OpState` per operator key, created
`pending` by the planner and committed `done`/`failed` by a worker. A later request for
the same key is served from the committed entry (completed dedup). So:

* `entries` / `stats` read fm_ops, filtered by key (or a key prefix), kind, executor,
  version and state.
* `invalidate` deletes matching entries (compare-and-delete on the revision it read). The
  planner creates a deleted key again on the next request, so that work runs again.
  Pending entries are in flight and are left alone. Blobs are not touched: results that
  workflows already recorded in fm_wf stay readable.
* `gc` deletes CAS blobs that nothing reaches any more (see `live_set`) and that are older
  than a grace period, which protects blobs written by work still in flight (not yet
  referenced by any KV entry).

Model manifests are read as plain JSON records ({"name": ..., "files": {name: digest}});
engine/ never imports workers/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue

from flowmesh.engine.cli_options import (
    _cas,
    _run,
    cas_option,
    connect_timeout,
    data_option,
    nats_option,
)
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.bus import WRONG_LAST_SEQUENCE
from flowmesh.topics.cas import CAS, CASError
from flowmesh.topics.codec import digest_of, is_digest
from flowmesh.topics.messages import OpState, WorkflowStatus

_READ_CONCURRENCY = 64


class CacheError(ValueError):
    pass


@dataclass(frozen=True)
class Selector:
    """Which cache entries a call means. `key` is an operator key or a prefix of one."""

    key: str | None = None
    kind: str | None = None
    executor: str | None = None
    version: str | None = None
    state: str | None = None

    def empty(self) -> bool:
        return not any((self.key, self.kind, self.executor, self.version, self.state))

    def matches(self, op: OpState) -> bool:
        return (
            (self.key is None or op.key.startswith(self.key))
            and (self.kind is None or op.spec.kind == self.kind)
            and (self.executor is None or op.spec.executor == self.executor)
            and (self.version is None or op.spec.version == self.version)
            and (self.state is None or op.state == self.state)
        )


# --- reading the KV -------------------------------------------------------------------


async def _op_entries(bus: Bus, sel: Selector) -> list[tuple[OpState, int]]:
    kv = await bus.kv(streams.KV_OPS)
    if sel.key is not None and is_digest(sel.key):
        try:
            entry = await kv.get(sel.key)
        except KeyNotFoundError:
            return []
        rows = [(sel.key, entry.value, entry.revision or 0)] if entry.value else []
    else:
        rows = await bus.kv_items(streams.KV_OPS)
    out = []
    for _key, value, revision in rows:
        try:
            op = codec.decode(value, OpState)
        except codec.DecodeError:
            continue  # not ours to judge here; gc and the planner report such entries
        if sel.matches(op):
            out.append((op, revision))
    out.sort(key=lambda pair: pair[0].created_at)
    return out


async def entries(
    bus: Bus,
    *,
    key: str | None = None,
    kind: str | None = None,
    executor: str | None = None,
    version: str | None = None,
    state: str | None = None,
) -> list[OpState]:
    """The cache entries (operator KV values) that match every given filter, oldest
    first. `key` is an operator key or a prefix of one."""
    sel = Selector(key, kind, executor, version, state)
    return [op for op, _ in await _op_entries(bus, sel)]


# --- stats ----------------------------------------------------------------------------


@dataclass
class StatsRow:
    kind: str
    executor: str
    version: str
    entries: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    outputs: int = 0
    device_seconds: float = 0.0
    cost_usd: float = 0.0
    energy_j: float = 0.0


@dataclass
class CacheStats:
    rows: list[StatsRow] = field(default_factory=list)  # one per kind + executor@version
    entries: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    by_executor: dict[str, int] = field(default_factory=dict)  # "executor@version" -> n
    device_seconds: float = 0.0
    cost_usd: float = 0.0
    energy_j: float = 0.0


def summarize(ops: Iterable[OpState]) -> CacheStats:
    st = CacheStats()
    rows: dict[tuple[str, str, str], StatsRow] = {}
    for op in ops:
        sp = op.spec
        row = rows.setdefault(
            (sp.kind, sp.executor, sp.version), StatsRow(sp.kind, sp.executor, sp.version)
        )
        row.entries += 1
        setattr(row, op.state, getattr(row, op.state) + 1)
        row.outputs += op.n_outputs
        row.device_seconds += op.device_seconds
        row.cost_usd += op.cost_usd
        row.energy_j += op.energy_j
        st.entries += 1
        st.by_state[op.state] = st.by_state.get(op.state, 0) + 1
        st.by_kind[sp.kind] = st.by_kind.get(sp.kind, 0) + 1
        ev = f"{sp.executor}@{sp.version}"
        st.by_executor[ev] = st.by_executor.get(ev, 0) + 1
        st.device_seconds += op.device_seconds
        st.cost_usd += op.cost_usd
        st.energy_j += op.energy_j
    st.rows = sorted(rows.values(), key=lambda r: (r.kind, r.executor, r.version))
    return st


async def stats(
    bus: Bus,
    *,
    key: str | None = None,
    kind: str | None = None,
    executor: str | None = None,
    version: str | None = None,
    state: str | None = None,
) -> CacheStats:
    """Counts per kind, executor@version and state, and the device time and cost the
    matching entries took to compute."""
    return summarize(
        await entries(bus, key=key, kind=kind, executor=executor, version=version, state=state)
    )


# --- invalidate -----------------------------------------------------------------------


class InvalidateResult(list[str]):
    """The operator keys invalidated (it is that list), with what was left alone:
    `skipped_pending` (in flight: a worker will commit them) and `changed` (the entry
    changed between reading and deleting it; nothing was deleted)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        super().__init__(keys)
        self.skipped_pending: list[str] = []
        self.changed: list[str] = []


async def invalidate(
    bus: Bus,
    *,
    key: str | None = None,
    kind: str | None = None,
    executor: str | None = None,
    version: str | None = None,
    state: Literal["done", "failed"] | None = None,
    all: bool = False,
) -> InvalidateResult:
    """Delete the matching fm_ops entries, so the next request for that work runs it
    again. A call with no selector is refused unless `all=True`. Entries still pending
    are skipped (listed in `.skipped_pending`). Blobs stay: workflow results already
    recorded stay readable until `gc` finds nothing referring to them."""
    sel = Selector(key, kind, executor, version, state)
    if sel.empty() and not all:
        raise CacheError("refusing to invalidate every cache entry without all=True")
    if state == "pending":  # type: ignore[comparison-overlap]
        raise CacheError("pending entries are in flight and cannot be invalidated")
    kv = await bus.kv(streams.KV_OPS)
    result = InvalidateResult()
    for op, revision in await _op_entries(bus, sel):
        if op.state == "pending":
            result.skipped_pending.append(op.key)
            continue
        if await _delete_if_unchanged(kv, op.key, revision):
            result.append(op.key)
        else:
            result.changed.append(op.key)
    return result


async def _delete_if_unchanged(kv: KeyValue, key: str, revision: int) -> bool:
    try:
        await kv.delete(key, last=revision)
    except APIError as exc:
        if getattr(exc, "err_code", None) in WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


# --- garbage collection ---------------------------------------------------------------


@dataclass
class GcReport:
    blobs: int = 0  # blobs in the CAS when gc listed it
    live: int = 0  # digests reachable from fm_ops, fm_wf and fm_models
    kept: int = 0  # blobs in the CAS that are reachable
    deleted: int = 0  # unreachable and older than the grace period (dry run: would be)
    young: int = 0  # unreachable but within the grace period: kept
    dry_run: bool = False
    grace_s: float = 0.0
    seconds: float = 0.0
    # referenced digests that are not in the CAS: digest -> who refers to it
    missing: dict[str, str] = field(default_factory=dict)
    # done fm_ops entries whose results are (partly) gone: a request would be served a
    # result that cannot be read; `invalidate --key` them (or gc --invalidate-dangling)
    dangling_ops: list[str] = field(default_factory=list)
    invalidated: list[str] = field(default_factory=list)  # dangling ops invalidated
    unreadable_entries: list[str] = field(default_factory=list)  # KV values not decodable
    deleted_digests: list[str] = field(default_factory=list)


class _Marker:
    """Builds the live set: every digest reachable from the KV buckets."""

    def __init__(self, cas: CAS, present: set[str] | None, report: GcReport) -> None:
        self.cas = cas
        self.present = present  # what the CAS listing held; None: do not check
        self.report = report
        self.live: set[str] = set()
        self.absent: dict[str, str] = {}  # live digests not in `present` -> a referrer
        # records of source tables: the planner does not store them one by one when only
        # record operators read them (they read the row from the table)
        self.table_rows: set[str] = set()
        self._lists: dict[str, list[str] | None] = {}
        self._sem = asyncio.Semaphore(_READ_CONCURRENCY)

    def mark(self, digest: str | None, where: str) -> bool:
        """Add a digest to the live set; False when the CAS listing did not hold it."""
        if not digest or not is_digest(digest):
            return True
        self.live.add(digest)
        if self.present is not None and digest not in self.present:
            self.absent.setdefault(digest, where)
            return False
        return True

    def mark_all(self, digests: Iterable[str], where: str) -> bool:
        ok = True
        for d in digests:
            ok = self.mark(d, where) and ok
        return ok

    async def _read(self, digest: str, what: Literal["manifest", "model"]) -> list[str] | None:
        if digest in self._lists:
            return self._lists[digest]
        async with self._sem:
            try:
                if what == "manifest":
                    listed: list[str] | None = await self.cas.get_manifest(digest)
                else:
                    record = await self.cas.get_record(digest)
                    files = record.get("files")
                    listed = (
                        [d for d in files.values() if isinstance(d, str) and is_digest(d)]
                        if isinstance(files, dict)
                        else []
                    )
            except CASError:
                listed = None
        self._lists[digest] = listed
        return listed

    async def _listing(
        self, digest: str | None, where: str, what: Literal["manifest", "model"]
    ) -> bool:
        """Mark a manifest (or model manifest) and every digest it lists; False when it
        or one of them is gone (or the manifest cannot be read)."""
        if not digest:
            return True
        self.mark(digest, where)
        listed = await self._read(digest, what)
        if listed is None:
            self.absent.setdefault(digest, where)  # missing, or present but unreadable
            return False
        return self.mark_all(listed, f"{where} (listed in {digest[:12]})")

    async def manifest(self, digest: str | None, where: str) -> bool:
        return await self._listing(digest, where, "manifest")

    async def model(self, digest: str | None, where: str) -> bool:
        return await self._listing(digest, where, "model")

    async def op(self, op: OpState) -> bool:
        """Mark what an operator entry reaches; False when its committed result is
        (partly) gone from the CAS."""
        where = f"fm_ops {op.key[:12]} ({op.spec.executor})"
        sp = op.spec
        if sp.fanout == "all":
            for m in sp.inputs:
                await self.manifest(m, f"{where} input")
        else:
            self.mark_all(sp.inputs, f"{where} input")
        await self.model(sp.model, f"{where} model")
        # an adapter manifest lists its files like a model manifest does
        await self.model(sp.adapter, f"{where} adapter")
        if op.state != "done" or (not op.output and op.outputs is None):
            return True
        if op.outputs is not None:  # inline: no need to read the manifest (small
            # results have none)
            ok = self.mark(op.output, f"{where} output") if op.output else True
            ok = self.mark_all(op.outputs, f"{where} output") and ok
        else:
            ok = await self.manifest(op.output, f"{where} output")
        if sp.kind == "train" and ok:
            # a train op's record names the adapter it made (a manifest listing files,
            # like a model's): it stays reachable as long as the record does
            listed = op.outputs
            if listed is None and op.output:
                listed = await self._read(op.output, "manifest")
            listed = listed or []
            for d in listed:
                try:
                    adapter = (await self.cas.get_record(d)).get("adapter")
                except CASError:
                    continue
                if isinstance(adapter, str):
                    ok = await self.model(adapter, f"{where} output adapter") and ok
        return ok

    async def workflow(self, wf: WorkflowStatus) -> None:
        where = f"fm_wf {wf.workflow_id}"
        for name, ns in wf.nodes.items():
            await self.manifest(ns.output, f"{where} node {name} output")
            # a list of operator keys, not of blobs: only the manifest itself is live
            self.mark(ns.ops, f"{where} node {name} ops")
        for name, m in wf.datasets.items():
            await self.manifest(m, f"{where} dataset {name}")
        for name, t in wf.tables.items():
            if self.mark(t, f"{where} table {name}") and self.present is not None:
                with contextlib.suppress(CASError):
                    self.table_rows.update(digest_of(r) for r in await self.cas.get_table(t))


async def live_set(bus: Bus, cas: CAS) -> set[str]:
    """Every digest reachable from (a) each fm_ops entry: its inputs (manifests of
    whole-dataset operators with their records), its model manifest and files, its
    output manifest and records; (b) each fm_wf workflow: node outputs and their records,
    node op manifests, dataset manifests and their records, dataset tables; (c) each
    model in fm_models: its manifest and files."""
    marker = _Marker(cas, None, GcReport())
    await _mark_all(bus, marker)
    return marker.live


async def _mark_all(bus: Bus, marker: _Marker) -> list[str]:
    """Mark everything; returns the keys of dangling done operators."""
    report = marker.report
    ops: list[OpState] = []
    for key, value, _rev in await bus.kv_items(streams.KV_OPS):
        try:
            ops.append(codec.decode(value, OpState))
        except codec.DecodeError:
            report.unreadable_entries.append(f"{streams.KV_OPS}/{key}")
    wfs: list[WorkflowStatus] = []
    for key, value, _rev in await bus.kv_items(streams.KV_WF):
        try:
            wfs.append(codec.decode(value, WorkflowStatus))
        except codec.DecodeError:
            report.unreadable_entries.append(f"{streams.KV_WF}/{key}")
    models = [
        (key, value.decode(errors="replace").strip())
        for key, value, _rev in await bus.kv_items(streams.KV_MODELS)
    ]
    oks = await asyncio.gather(*(marker.op(op) for op in ops))
    await asyncio.gather(*(marker.workflow(wf) for wf in wfs))
    await asyncio.gather(*(marker.model(d, f"fm_models {name}") for name, d in models))
    return [op.key for op, ok in zip(ops, oks, strict=True) if not ok]


async def gc(
    bus: Bus,
    cas: CAS,
    *,
    grace_s: float = 3600.0,
    dry_run: bool = False,
    invalidate_dangling: bool = False,
) -> GcReport:
    """Delete every CAS blob that nothing reaches (see `live_set`) and that is older
    than `grace_s`. A referenced digest that is not in the CAS is reported in `missing`;
    done operator entries whose results are gone in `dangling_ops` (and deleted from
    fm_ops with `invalidate_dangling`, so their work runs again on the next request)."""
    started = time.monotonic()
    report = GcReport(dry_run=dry_run, grace_s=grace_s)
    # list first, mark second: a blob put after the listing is not a candidate, and one
    # referenced before the marking ends is live
    listed: dict[str, float] = {}
    async for digest, mtime in cas.list():
        listed[digest] = mtime
    report.blobs = len(listed)
    marker = _Marker(cas, set(listed), report)
    dangling = await _mark_all(bus, marker)
    live = marker.live
    report.live = len(live)
    # what looked missing may have been written after the listing: look again
    for digest, where in marker.absent.items():
        if digest in marker.table_rows:
            continue  # a row of a table that is there
        if digest in listed or not await _exists(cas, digest):
            report.missing[digest] = where
    for key in dangling:
        st = await _op_state(bus, key)
        if st is not None and st.state == "done" and not await _result_readable(cas, st):
            report.dangling_ops.append(key)
    cutoff = time.time() - grace_s
    for digest, mtime in listed.items():
        if digest in live:
            report.kept += 1
        elif mtime > cutoff:
            report.young += 1
        else:
            report.deleted += 1
            report.deleted_digests.append(digest)
    if not dry_run:
        sem = asyncio.Semaphore(_READ_CONCURRENCY)

        async def delete(digest: str) -> None:
            async with sem:
                await cas.delete(digest)

        await asyncio.gather(*(delete(d) for d in report.deleted_digests))
        if invalidate_dangling and report.dangling_ops:
            kv = await bus.kv(streams.KV_OPS)
            for key in report.dangling_ops:
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    continue
                if await _delete_if_unchanged(kv, key, entry.revision or 0):
                    report.invalidated.append(key)
    report.seconds = time.monotonic() - started
    return report


async def _exists(cas: CAS, digest: str) -> bool:
    try:
        return await cas.exists(digest)
    except CASError:
        return False


async def _op_state(bus: Bus, key: str) -> OpState | None:
    kv = await bus.kv(streams.KV_OPS)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return codec.decode(entry.value, OpState)
    except codec.DecodeError:
        return None


async def _result_readable(cas: CAS, st: OpState) -> bool:
    if not st.output and st.outputs is None:
        return True
    try:
        outputs = st.outputs if st.outputs is not None else await cas.get_manifest(st.output or "")
        if st.output and not await cas.exists(st.output):
            return False
        for d in outputs:
            if not await cas.exists(d):
                return False
    except CASError:
        return False
    return True


# --- CLI ------------------------------------------------------------------------------


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
                from flowmesh.topics.cas import open_cas

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
