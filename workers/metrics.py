"""Prometheus metrics of a worker and their HTTP exporter.

The runtime reports each batch it ran and each operator it committed. Cost and energy
come from the committed OpState (its share of the batch's device time at this class's
$/h and watts), counted only when this worker's compare-and-set won, so a replayed or
duplicate execution is never counted twice, just as it is never billed twice.

(engine/metrics.py holds the engine's side; the two packages never import each other.)
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from flowmesh.topics.exporter import serve as serve
from flowmesh.topics.messages import OpState

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


def batch_ran(kind: str, device_class: str, size: int, seconds: float) -> None:
    BATCH_SECONDS.labels(kind, device_class).observe(seconds)
    BATCH_SIZE.labels(kind, device_class).observe(size)


def op_committed(state: OpState) -> None:
    """This worker's commit of `state` won: count its outcome and charge its tenant."""
    kind, cls = state.spec.kind, state.device_class
    OPS.labels(kind, cls, state.state).inc()
    OP_LATENCY.labels(kind, cls).observe(max(0.0, state.ended_at - state.started_at))
    COST_USD.labels(state.tenant, cls).inc(max(0.0, state.cost_usd))
    ENERGY_J.labels(state.tenant, cls).inc(max(0.0, state.energy_j))
    DEVICE_SECONDS.labels(state.tenant, cls).inc(max(0.0, state.device_seconds))


def resident_models(n: int) -> None:
    RESIDENT_MODELS.set(n)
