"""Prometheus metrics of the engine (planner + scheduler) and their HTTP exporter.

The planner and the scheduler call the small functions below at the points that know
the facts; nothing here reads the bus. Worker-side metrics (operator latency, $ and
energy by tenant) live in workers/metrics.py and are scraped from each worker.

Label values are bounded: kinds, pools, device classes, tenants and workflow states,
never operator keys or workflow ids.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from flowmesh.topics.operators import pool_of
from flowmesh.topics.telemetry.exporter import child
from flowmesh.topics.telemetry.exporter import serve as serve

# batches hold up to a few hundred operators; powers of two read well on a dashboard
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

WORKFLOWS_SUBMITTED = Counter(
    "flowmesh_workflows_submitted_total", "Workflows the planner accepted", ["tenant"]
)
WORKFLOWS_FINISHED = Counter(
    "flowmesh_workflows_finished_total",
    "Workflows that completed, failed or were rejected",
    ["tenant", "state"],
)
WORKFLOWS_RUNNING = Gauge("flowmesh_workflows_running", "Workflows the planner is running")
OP_REQUESTS = Counter(
    "flowmesh_op_requests_total",
    "Operators workflows asked for, by how they were served: ran (created), joined "
    "(in flight for another workflow) or reused (already committed)",
    ["kind", "tenant", "role"],
)
OPS_CREATED = Counter(
    "flowmesh_ops_created_total", "Operators created (the request ran them)", ["kind", "tenant"]
)
DEDUP_HITS = Counter(
    "flowmesh_dedup_hits_total",
    "Requests served by an operator that existed already (joined in flight or reused)",
    ["kind", "tenant", "role"],
)
READY_DEPTH = Gauge(
    "flowmesh_ready_ops", "Ready operators the scheduler holds, waiting for a worker", ["pool"]
)
LIVE_WORKERS = Gauge("flowmesh_live_workers", "Workers with a fresh heartbeat", ["device_class"])
ASSIGNMENTS = Counter(
    "flowmesh_assignments_total", "Batches assigned to workers", ["kind", "device_class"]
)
ASSIGNED_OPS = Counter(
    "flowmesh_assigned_ops_total", "Operators assigned to workers", ["kind", "device_class"]
)
BATCH_SIZE = Histogram(
    "flowmesh_scheduler_batch_size",
    "Operators per assigned batch",
    ["kind", "device_class"],
    buckets=BATCH_BUCKETS,
)
BATCH_WORKFLOWS = Histogram(
    "flowmesh_scheduler_batch_workflows",
    "Distinct workflows per assigned batch (batching across workflows)",
    ["kind"],
    buckets=BATCH_BUCKETS,
)
RECLAIMED_OPS = Counter(
    "flowmesh_reclaimed_ops_total", "Operators taken back from dead workers and made ready again"
)
PLANNER_RETRIES = Counter(
    "flowmesh_planner_retries_total",
    "Planner steps the bus or the store refused, to be done again: a wave of operators "
    "to start (start), a node to complete (complete), a trained adapter to release "
    "(adapter), a completion message delivered again (done), a submission read again "
    "(accept)",
    ["what"],
)


def workflow_submitted(tenant: str) -> None:
    WORKFLOWS_SUBMITTED.labels(tenant).inc()


def workflow_finished(tenant: str, state: str) -> None:
    WORKFLOWS_FINISHED.labels(tenant, state).inc()


def workflows_running(n: int) -> None:
    WORKFLOWS_RUNNING.set(n)


def op_requested(kind: str, tenant: str, role: str, n: int = 1) -> None:
    """`n` requests of operators of `kind` by `tenant`, in `role` (a wave counts each
    label set once: three locked increments per operator were a tenth of a wave)."""
    child(OP_REQUESTS, kind, tenant, role).inc(n)
    if role == "ran":
        child(OPS_CREATED, kind, tenant).inc(n)
    else:
        child(DEDUP_HITS, kind, tenant, role).inc(n)


_seen: dict[str, set[str]] = {"pool": set(), "device_class": set()}


def _set_all(gauge: Gauge, what: str, values: dict[str, int]) -> None:
    # a label that emptied must read 0, not keep its last value
    _seen[what].update(values)
    for label in _seen[what]:
        gauge.labels(label).set(values.get(label, 0))


def ready_depth(per_kind: dict[str, int]) -> None:
    """Ready operators held, given per operator kind, exported per pool."""
    per_pool: dict[str, int] = {}
    for kind, n in per_kind.items():
        pool = pool_of(kind)
        per_pool[pool] = per_pool.get(pool, 0) + n
    _set_all(READY_DEPTH, "pool", per_pool)


def live_workers(per_class: dict[str, int]) -> None:
    _set_all(LIVE_WORKERS, "device_class", per_class)


def batch_assigned(kind: str, device_class: str, workflow_ids: list[str]) -> None:
    """One batch went to a worker; `workflow_ids` has one entry per operator in it."""
    ASSIGNMENTS.labels(kind, device_class).inc()
    ASSIGNED_OPS.labels(kind, device_class).inc(len(workflow_ids))
    BATCH_SIZE.labels(kind, device_class).observe(len(workflow_ids))
    BATCH_WORKFLOWS.labels(kind).observe(len(set(workflow_ids)))


_last: dict[str, float] = {}


def due(what: str, every_s: float) -> bool:
    """True at most once per `every_s` for `what`: gauges a hot loop sets, sampled."""
    now = time.monotonic()
    if now - _last.get(what, 0.0) < every_s:
        return False
    _last[what] = now
    return True


def ops_reclaimed(n: int) -> None:
    RECLAIMED_OPS.inc(n)


def planner_retry(what: str) -> None:
    PLANNER_RETRIES.labels(what).inc()
