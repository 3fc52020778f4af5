"""Garbage-collecting the CAS: the live set (every digest the KV buckets reach) and the
sweep of what is unreachable and older than a grace period."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from nats.js.errors import KeyNotFoundError

from flowmesh.engine.cache.invalidate import delete_if_unchanged
from flowmesh.engine.lineage.reads import op_state
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.codec import digest_of, is_digest
from flowmesh.topics.messages import OpState, WorkflowStatus
from flowmesh.topics.store.cas import CAS, CASError

_READ_CONCURRENCY = 64


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
        st = await op_state(bus, key)
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
                if await delete_if_unchanged(kv, key, entry.revision or 0):
                    report.invalidated.append(key)
    report.seconds = time.monotonic() - started
    return report


async def _exists(cas: CAS, digest: str) -> bool:
    try:
        return await cas.exists(digest)
    except CASError:
        return False


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
