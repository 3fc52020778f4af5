"""What one simulated run measured, and how the policies compare with the strongest
baseline.

Cost and energy follow the billing rules in loadgen/sim/pool.py. Workflow latency is
arrival -> completion (the last operator done, dedup hits included). Operators
`requested` counts every workflow operator that became ready; `executed` the executions
that completed (under dedup one per distinct key; a replay after a preemption is the same
execution, counted in `replayed_ops`); `dedup_hits` = requested - executed. Batch size is
operators per completed batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flowmesh.engine.scheduler.fleet import Fleet
from flowmesh.engine.scheduler.policy import PolicyConfig
from flowmesh.loadgen.sim.policies import FlowMeshPolicy, make_policy
from flowmesh.loadgen.sim.simulator import Simulation
from flowmesh.loadgen.sim.workload import Workload


@dataclass
class PolicyResult:
    policy: str
    workflows: int
    completed: int
    cost_usd: float
    energy_kwh: float
    makespan_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_mean_s: float
    gpu_util: float
    gpu_hours: float  # allocated GPU time
    gpu_busy_hours: float
    peak_gpus: int
    cpu_hours: float
    ops_requested: int
    ops_executed: int
    dedup_hits: int
    dedup_hits_inflight: int
    replayed_ops: int
    batches: int
    mean_batch_size: float
    mean_gpu_batch_size: float
    preemptions: int
    lost_batches: int
    model_loads: int
    cost_by_class: dict[str, float] = field(default_factory=dict)
    # "kind@class" -> batches, operators, mean batch size, busy hours
    batches_by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)  # per workflow, arrival order
    timing: dict[str, float] = field(default_factory=dict)  # wall clock: not reproducible

    def summary(self) -> dict[str, Any]:
        """The deterministic figures (no per-workflow list, no wall-clock timing)."""
        out = asdict(self)
        out.pop("latencies_s")
        out.pop("timing")
        return out


def measure(sim: Simulation, wall_s: float) -> PolicyResult:
    lat = [sim.completions[i.id] - i.arrival for i in sim.instances if i.id in sim.completions]
    pct = np.percentile(lat, [50, 95, 99]).tolist() if lat else [float("nan")] * 3
    start = min((i.arrival for i in sim.instances), default=0.0)
    end = max(sim.completions.values(), default=start)
    gpu = [w for w in sim.pool.workers if w.pool == "gpu"]
    gpu_alloc = sum(w.alloc_s for w in gpu)
    gpu_busy = sum(w.busy_s for w in gpu)
    by_class: dict[str, float] = {}
    for w in sim.pool.workers:
        by_class[w.device.name] = by_class.get(w.device.name, 0.0) + w.cost_usd()
    gpu_batches = gpu_ops = 0
    for (_, cls), (b, n, _) in sim.by_kind.items():
        if sim.fleet.classes[cls].kind == "gpu":
            gpu_batches += int(b)
            gpu_ops += int(n)
    timing = {"wall_s": wall_s, "events": float(sim.events), "rounds": float(sim.rounds)}
    if isinstance(sim.policy, FlowMeshPolicy):
        p = sim.policy
        timing["decide_calls"] = float(p.decide_calls)
        timing["decide_ms_mean"] = 1000 * p.decide_s / max(p.decide_calls, 1)
        timing["decide_items_mean"] = p.decide_items / max(p.decide_calls, 1)
    return PolicyResult(
        policy=sim.policy.name,
        workflows=len(sim.instances),
        completed=len(sim.completions),
        cost_usd=sum(w.cost_usd() for w in sim.pool.workers),
        energy_kwh=sum(w.energy_j() for w in sim.pool.workers) / 3.6e6,
        makespan_s=end - start,
        latency_p50_s=pct[0],
        latency_p95_s=pct[1],
        latency_p99_s=pct[2],
        latency_mean_s=float(np.mean(lat)) if lat else float("nan"),
        gpu_util=gpu_busy / gpu_alloc if gpu_alloc > 0 else 0.0,
        gpu_hours=gpu_alloc / 3600,
        gpu_busy_hours=gpu_busy / 3600,
        peak_gpus=sim.pool.peak_gpus,
        cpu_hours=sum(w.alloc_s for w in sim.pool.workers if w.pool == "cpu") / 3600,
        ops_requested=sim.requested,
        ops_executed=sim.executed,
        dedup_hits=sim.requested - sim.executed,
        dedup_hits_inflight=sim.hits_inflight,
        replayed_ops=sim.replayed,
        batches=sim.batches,
        mean_batch_size=sim.batch_ops / sim.batches if sim.batches else 0.0,
        mean_gpu_batch_size=gpu_ops / gpu_batches if gpu_batches else 0.0,
        preemptions=sim.preemptions,
        lost_batches=sim.lost_batches,
        model_loads=sim.loads,
        cost_by_class=dict(sorted(by_class.items())),
        batches_by_kind={
            f"{k}@{c}": {
                "batches": b,
                "operators": n,
                "mean_batch": n / b,
                "busy_hours": busy / 3600,
            }
            for (k, c), (b, n, busy) in sorted(sim.by_kind.items())
        },
        latencies_s=lat,
        timing=timing,
    )


def simulate(
    workload: Workload,
    fleet: Fleet,
    config: PolicyConfig,
    policy: str,
    progress: Callable[[int, int], None] | None = None,
) -> PolicyResult:
    t0 = time.perf_counter()
    pol = make_policy(policy, fleet, config, workload.settings)
    sim = Simulation(workload, fleet, pol, config, progress).run()
    return measure(sim, time.perf_counter() - t0)


METRICS = {  # ratio -> (result attribute, lower is better)
    "cost_reduction_x": "cost_usd",
    "energy_reduction_x": "energy_kwh",
    "p50_latency_ratio": "latency_p50_s",
    "p95_latency_ratio": "latency_p95_s",
    "p99_latency_ratio": "latency_p99_s",
    "makespan_ratio": "makespan_s",
}


def strongest(results: Mapping[str, PolicyResult]) -> dict[str, str]:
    """Per metric, the baseline (every policy but flowmesh) that does best on it: the
    one each ratio is taken against."""
    base = {n: r for n, r in results.items() if n != "flowmesh" and r.completed == r.workflows}
    base = base or {n: r for n, r in results.items() if n != "flowmesh"}
    if not base:
        return {}
    return {k: min(base, key=lambda n: getattr(base[n], attr)) for k, attr in METRICS.items()}


def ratios(results: Mapping[str, PolicyResult], base: str | None = None) -> dict[str, Any]:
    """Per policy: reductions (base / policy: >1 is better) for cost and energy, and
    latency ratios (policy / base: <1 is better), against `base`, or by default against
    the strongest baseline on each metric (`strongest`; named under "against")."""
    if base is not None and base not in results:
        return {}
    against = {k: base for k in METRICS} if base is not None else strongest(results)
    if not against:
        return {}
    out: dict[str, Any] = {}
    for name, r in results.items():
        row: dict[str, Any] = {}
        for k, attr in METRICS.items():
            b = results[against[k]]
            if k.endswith("reduction_x"):
                row[k] = _div(getattr(b, attr), getattr(r, attr))
            else:
                row[k] = _div(getattr(r, attr), getattr(b, attr))
        out[name] = row
    out["against"] = dict(against)
    return out


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def comparison(
    workload: Workload, results: Sequence[PolicyResult], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """The results.json document."""
    by_name = {r.policy: r for r in results}
    return {
        "workload": workload.name,
        "seed": workload.seed,
        **meta,
        "policies": {r.policy: r.summary() for r in results},
        "ratios_vs_strongest_baseline": ratios(by_name),
        "ratios_vs": {n: ratios(by_name, n) for n in by_name if n != "flowmesh"},
        "latencies_s": {r.policy: r.latencies_s for r in results},
        "timing": {r.policy: r.timing for r in results},
    }
