"""What the fabric is doing right now, gathered from the bus in one pass.

`flowmesh top` (engine/top.py) and the web console (engine/console/) both render a
`Snapshot`, so the terminal and the browser never disagree. Everything comes from the
bus itself, never from one engine's memory, so it works against any fabric and after
any restart:

* streams and consumer lag: the transport's stats (topics/bus/transport.py): on NATS
  JetStream stream/consumer info (messages not yet delivered and delivered but unacked,
  per consumer), on Kafka the topics of each role and their groups' committed offsets;
* ready-pool depth per pool and batches in flight per worker: per subject of FM_READY
  and FM_ASSIGN, what their consumers have not acked yet (on either bus);
* workers: their heartbeats in KV fm_workers (class, slots, resident models);
* workflows, their nodes and operator counts: KV fm_wf;
* dedup hit rate, per-tenant throughput and $: KV fm_ops and fm_requests, split with
  the same rules as `flowmesh cost` (engine/cost.py).

Reading fm_ops and fm_requests is a full scan of both buckets, so a snapshot costs in
proportion to the operators kept; refresh every few seconds, not in a tight loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog

from flowmesh.engine.cost import attribute, kv_values
from flowmesh.engine.lineage.reads import request_records, unique_requests
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.bus.transport import ConsumerStat, StreamStat
from flowmesh.topics.messages import OpRequest, OpState, WorkerInfo, WorkflowStatus

log = structlog.get_logger("flowmesh.monitor")

THROUGHPUT_WINDOW_S = 60.0  # per-tenant throughput: operators finished in this window
# what the bus reports of its streams and consumers (topics/bus/transport.py): on NATS
# JetStream's stream and consumer info, on Kafka the topics of each role and the offsets
# their consumer groups committed
StreamRow = StreamStat
ConsumerRow = ConsumerStat


@dataclass
class WorkerRow:
    worker: str
    device_class: str
    pools: list[str]
    slots: int
    in_flight: int  # batches assigned and not yet acked
    load: float  # in_flight / slots
    models: dict[str, str]  # name -> weights digest it serves
    resident: list[str]  # names (or short digests) of the models loaded now
    batches_done: int
    age_s: float  # since its last heartbeat
    stopping: bool
    price_per_hour: float
    watts: float
    last_batch: str  # "generate x8 in 1.20s"


@dataclass
class NodeRow:
    name: str
    op: str  # operator kind, or "dataset" for a source
    inputs: list[str]
    total: int
    done: int
    failed: int
    reused: int
    complete: bool
    n_outputs: int
    model: str | None = None
    fn: str | None = None


@dataclass
class WorkflowRow:
    workflow_id: str
    name: str
    tenant: str
    state: str
    dedup_scope: str
    submitted_at: float
    ended_at: float | None
    seconds: float
    ops_total: int
    ops_done: int
    ops_failed: int
    ops_reused: int
    error: str | None
    nodes: list[NodeRow]
    paid_usd: float = 0.0


@dataclass
class TenantRow:
    tenant: str
    workflows: int
    running: int
    ops: int  # operators its workflows asked for
    ops_recent: int  # of which finished in the last THROUGHPUT_WINDOW_S
    ops_per_s: float
    paid_usd: float
    paid_energy_j: float
    saved_usd: float


@dataclass
class Dedup:
    requests: int = 0
    ran: int = 0
    joined: int = 0
    reused: int = 0

    @property
    def hit_rate(self) -> float:
        return (self.joined + self.reused) / self.requests if self.requests else 0.0


@dataclass
class Snapshot:
    at: float
    streams: list[StreamRow]
    consumers: list[ConsumerRow]
    ready_by_pool: dict[str, int]
    batches_in_flight: int
    workers: list[WorkerRow]
    workflows: list[WorkflowRow]
    tenants: list[TenantRow]
    dedup: Dedup
    total_usd: float
    total_energy_j: float
    operators: int  # committed (done or failed)
    errors: list[str] = field(default_factory=list)  # parts that could not be read

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = codec.to_builtins(self)
        out["dedup"]["hit_rate"] = self.dedup.hit_rate
        return out


# --- gathering --------------------------------------------------------------------------


def _by_suffix(subjects_count: dict[str, int], prefix: str) -> dict[str, int]:
    return {
        subject[len(prefix) + 1 :]: n
        for subject, n in subjects_count.items()
        if subject.startswith(prefix + ".")
    }


def _worker_rows(infos: list[WorkerInfo], in_flight: dict[str, int], now: float) -> list[WorkerRow]:
    rows = []
    for w in sorted(infos, key=lambda w: w.worker):
        names = {digest: name for name, digest in w.models.items()}
        n = in_flight.get(w.worker, 0)
        last = (
            f"{w.last_batch_kind} x{w.last_batch_size} in {w.last_batch_seconds:.2f}s"
            if w.last_batch_size
            else ""
        )
        rows.append(
            WorkerRow(
                worker=w.worker,
                device_class=w.device_class,
                pools=list(w.pools),
                slots=w.slots,
                in_flight=n,
                load=n / w.slots if w.slots else 0.0,
                models=dict(w.models),
                resident=[names.get(d, d[:12]) for d in w.resident],
                batches_done=w.batches_done,
                age_s=max(0.0, now - w.sent_at),
                stopping=w.stopping,
                price_per_hour=w.price_per_hour,
                watts=w.watts,
                last_batch=last,
            )
        )
    return rows


def _dataset_row(name: str, complete: bool) -> NodeRow:
    """A source dataset as a DAG node (complete once uploaded)."""
    return NodeRow(
        name=name,
        op="dataset",
        inputs=[],
        total=0,
        done=0,
        failed=0,
        reused=0,
        complete=complete,
        n_outputs=0,
    )


def workflow_row(st: WorkflowStatus, now: float) -> WorkflowRow:
    """A workflow with its DAG: source datasets, then nodes with operator counts."""
    nodes = [_dataset_row(name, complete=True) for name in st.datasets]
    for name, ns in st.nodes.items():
        spec = ns.spec
        nodes.append(
            NodeRow(
                name=name,
                op=spec.op if spec else "?",
                inputs=list(spec.inputs) if spec else [],
                total=ns.total,
                done=ns.done,
                failed=ns.failed,
                reused=ns.reused,
                complete=ns.complete,
                n_outputs=ns.n_outputs,
                model=spec.model if spec else None,
                fn=spec.fn if spec else None,
            )
        )
    # a source named as an input but not yet in `datasets` (still uploading) is a node too
    known = {n.name for n in nodes}
    for missing in sorted({i for n in nodes for i in n.inputs} - known):
        nodes.insert(0, _dataset_row(missing, complete=False))
    return WorkflowRow(
        workflow_id=st.workflow_id,
        name=st.name,
        tenant=st.tenant,
        state=st.state,
        dedup_scope=st.dedup_scope,
        submitted_at=st.submitted_at,
        ended_at=st.ended_at,
        seconds=(st.ended_at or now) - st.submitted_at,
        ops_total=sum(n.total for n in st.nodes.values()),
        ops_done=sum(n.done for n in st.nodes.values()),
        ops_failed=sum(n.failed for n in st.nodes.values()),
        ops_reused=sum(n.reused for n in st.nodes.values()),
        error=st.error,
        nodes=nodes,
    )


def summarize(
    stream_rows: list[StreamRow],
    consumers: list[ConsumerRow],
    workers: list[WorkerInfo],
    statuses: dict[str, WorkflowStatus],
    states: list[OpState],
    requests: list[OpRequest],
    now: float,
) -> Snapshot:
    """Pure: the snapshot of what was read (tests feed it directly)."""
    by_name = {s.name: s for s in stream_rows}
    ready = by_name.get(streams.STREAM_READY)
    assign = by_name.get(streams.STREAM_ASSIGN)
    ready_by_pool = _by_suffix(ready.subjects if ready else {}, "fm.op.ready")
    in_flight = _by_suffix(assign.subjects if assign else {}, "fm.assign")
    report = attribute(states, requests, statuses)

    dedup = Dedup()
    roles = Counter(r.role for r in requests)
    dedup.ran, dedup.joined, dedup.reused = roles["ran"], roles["joined"], roles["reused"]
    dedup.requests = dedup.ran + dedup.joined + dedup.reused

    # throughput: operators finished lately, counted for every tenant that asked for them
    askers: dict[str, set[str]] = defaultdict(set)
    for r in requests:
        askers[r.key].add(r.tenant)
    recent: Counter[str] = Counter()
    for st in states:
        if st.state != "pending" and st.ended_at >= now - THROUGHPUT_WINDOW_S:
            for tenant in askers.get(st.key) or {st.tenant}:
                recent[tenant] += 1

    workflows = sorted(
        (workflow_row(st, now) for st in statuses.values()),
        key=lambda w: (w.state != "running", -w.submitted_at),
    )
    for w in workflows:
        bill = report.workflows.get(w.workflow_id)
        w.paid_usd = bill.paid_usd if bill else 0.0

    tenants: dict[str, TenantRow] = {}
    for w in workflows:
        t = tenants.setdefault(w.tenant, TenantRow(w.tenant, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
        t.workflows += 1
        t.running += w.state == "running"
    for name, bill in report.tenants.items():
        t = tenants.setdefault(name, TenantRow(name, bill.workflows, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
        t.ops = bill.ops
        t.paid_usd = bill.paid_usd
        t.paid_energy_j = bill.paid_energy_j
        t.saved_usd = bill.saved_usd
    for name, n in recent.items():
        t = tenants.setdefault(name, TenantRow(name, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
        t.ops_recent = n
        t.ops_per_s = n / THROUGHPUT_WINDOW_S

    return Snapshot(
        at=now,
        streams=stream_rows,
        consumers=consumers,
        ready_by_pool=ready_by_pool,
        batches_in_flight=sum(in_flight.values()),
        workers=_worker_rows(workers, in_flight, now),
        workflows=workflows,
        tenants=sorted(tenants.values(), key=lambda t: t.tenant),
        dedup=dedup,
        total_usd=report.total_usd,
        total_energy_j=report.total_energy_j,
        operators=report.operators,
    )


def _decode_all(values: dict[str, bytes], typ: type[Any], errors: list[str]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        try:
            out[key] = codec.decode(value, typ)
        except codec.DecodeError as exc:
            # one bad entry must not blank the whole console
            errors.append(f"{typ.__name__} {key}: {exc}")
    return out


def _decode_requests(values: dict[str, bytes], errors: list[str]) -> list[OpRequest]:
    """KV fm_requests' entries as requests (a wave's `ran` ones expanded)."""
    out: list[OpRequest] = []
    for key, value in values.items():
        try:
            out.extend(request_records(key, value))
        except codec.DecodeError as exc:
            errors.append(f"OpRequest {key}: {exc}")
    return unique_requests(out)


async def snapshot(bus: Bus) -> Snapshot:
    """Read everything the dashboards show, at once."""
    errors: list[str] = []
    (stream_rows, consumers), wk, wf, ops, reqs = await asyncio.gather(
        bus.transport.stats(),
        kv_values(bus, streams.KV_WORKERS),
        kv_values(bus, streams.KV_WF),
        kv_values(bus, streams.KV_OPS),
        kv_values(bus, streams.KV_REQUESTS),
    )
    workers = list(_decode_all(wk, WorkerInfo, errors).values())
    statuses = _decode_all(wf, WorkflowStatus, errors)
    states = list(_decode_all(ops, OpState, errors).values())
    requests = _decode_requests(reqs, errors)
    snap = summarize(stream_rows, consumers, workers, statuses, states, requests, time.time())
    snap.errors = errors[:20]
    return snap
