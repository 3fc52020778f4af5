"""Prometheus metrics of a worker and their HTTP exporter.

The runtime reports each batch it ran and each operator it committed. Cost and energy
come from the committed OpState (its share of the batch's device time at this class's
$/h and watts), counted only when this worker's compare-and-set won, so a replayed or
duplicate execution is never counted twice, just as it is never billed twice.

(engine/metrics.py holds the engine's side; the two packages never import each other.)
"""

from __future__ import annotations

import collections

from prometheus_client import Counter, Gauge, Histogram

from flowmesh.topics.messages import OpState
from flowmesh.topics.telemetry.exporter import child
from flowmesh.topics.telemetry.exporter import serve as serve

# CPU transforms take milliseconds, LLM batches seconds, training steps minutes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

OP_LATENCY = Histogram(
    "flowmesh_worker_op_seconds",
    "Time from the start of an operator's batch to its end on the device",
    ["kind", "device_class"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "flowmesh_worker_batch_seconds",
    "Wall time of one batch on the device",
    ["kind", "device_class"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "flowmesh_worker_batch_size",
    "Operators per batch executed",
    ["kind", "device_class"],
    buckets=BATCH_BUCKETS,
)
OPS = Counter(
    "flowmesh_worker_ops_total",
    "Operators committed by this worker, by outcome",
    ["kind", "device_class", "status"],
)
COST_USD = Counter(
    "flowmesh_tenant_cost_usd_total",
    "Device cost of committed operators, by the tenant whose request created them",
    ["tenant", "device_class"],
)
ENERGY_J = Counter(
    "flowmesh_tenant_energy_joules_total",
    "Device energy of committed operators, by the tenant whose request created them",
    ["tenant", "device_class"],
)
DEVICE_SECONDS = Counter(
    "flowmesh_tenant_device_seconds_total",
    "Device seconds of committed operators, by tenant",
    ["tenant", "device_class"],
)
RESIDENT_MODELS = Gauge("flowmesh_worker_resident_models", "Models loaded in memory")
OVER_WALL_TIME = Counter(
    "flowmesh_worker_ops_over_wall_time_total",
    "Batches whose executor thread was still blocked well past the wall-time limit and "
    "was left to end on its own (the operators failed)",
    ["kind"],
)


def batch_ran(kind: str, device_class: str, size: int, seconds: float) -> None:
    BATCH_SECONDS.labels(kind, device_class).observe(seconds)
    BATCH_SIZE.labels(kind, device_class).observe(size)


def ops_committed(states: list[OpState]) -> None:
    """This worker's commits of `states` won: count their outcomes and charge their
    tenants (summed per label set first: a batch of 256 is a few increments, not 1,280)."""
    ops: collections.Counter[tuple[str, str, str]] = collections.Counter()
    # the operators of one batch share its start and end: one observation of n
    latencies: collections.Counter[tuple[str, str, float]] = collections.Counter()
    charges: dict[tuple[str, str], list[float]] = {}
    for state in states:
        kind, cls = state.spec.kind, state.device_class
        ops[kind, cls, state.state] += 1
        latencies[kind, cls, max(0.0, state.ended_at - state.started_at)] += 1
        c = charges.setdefault((state.tenant, cls), [0.0, 0.0, 0.0])
        c[0] += max(0.0, state.cost_usd)
        c[1] += max(0.0, state.energy_j)
        c[2] += max(0.0, state.device_seconds)
    for labels, n in ops.items():
        child(OPS, *labels).inc(n)
    for (kind, cls, seconds), n in latencies.items():
        observe_n(child(OP_LATENCY, kind, cls), seconds, n)
    for (tenant, cls), (usd, joules, seconds) in charges.items():
        child(COST_USD, tenant, cls).inc(usd)
        child(ENERGY_J, tenant, cls).inc(joules)
        child(DEVICE_SECONDS, tenant, cls).inc(seconds)


def observe_n(hist: Histogram, amount: float, n: int) -> None:
    """`hist.observe(amount)` n times, as one increment of its sum and of the bucket
    (prometheus_client has no observe-many; each observe takes two locks). Falls back
    to observing n times if the client's layout is not the one this knows."""
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for _ in range(n):
            hist.observe(amount)
        return
    total.inc(amount * n)
    for i, bound in enumerate(bounds):
        if amount <= bound:
            buckets[i].inc(n)
            break


def op_abandoned(kind: str) -> None:
    OVER_WALL_TIME.labels(kind).inc()


def resident_models(n: int) -> None:
    RESIDENT_MODELS.set(n)
