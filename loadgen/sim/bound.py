"""What the physics of a mix allows at best: the floor under any policy's cost and energy.

A workload's unique work is every distinct operator key its workflows request (what
perfect dedup leaves), grouped by batch key (kind, model, params: what one batch may
hold). The floors price that work as no scheduler can beat it:

- every batch key's operators in full batches (perfect cross-workflow batching), on the
  shared pool's class that runs them for the fewest dollars (`cost`) or joules
  (`energy`), the model-size factor applied as the emulator does;
- each distinct model loaded once on that class, one cold start per pool with work;
- nothing idle: no cold start waited out, no idle tail, no reload.

`fastest` prices the same work on the fastest class per batch key: the bill of buying
the speed a tight p95 needs (the critical paths of the mix at the fastest class's
speed). So a target "cost >= X x the strongest baseline" needs the policy's bill at or
under baseline / X, and the mix allows at most baseline / floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flowmesh.engine.scheduler.elastic import can_run, kind_pools, size_factor
from flowmesh.engine.scheduler.fleet import DeviceClass, Fleet
from flowmesh.loadgen.sim.workload import Workload, expand, instances


@dataclass(frozen=True)
class Floor:
    requested_ops: int
    unique_ops: int
    cost_usd: float  # every batch key on its cheapest class
    energy_kwh: float  # every batch key on its most frugal class (busy watts)
    fastest_cost_usd: float  # every batch key on its fastest class
    fastest_energy_kwh: float


@dataclass
class _Key:
    kind: str
    model: str
    model_gb: float
    ops: int = 0


def _busy_s(dev: DeviceClass, k: _Key, ref: Mapping[str, float]) -> float:
    m = dev.latency[k.kind]
    batches = math.ceil(k.ops / max(m.max_batch, 1))
    sf = max(size_factor(ref, k.kind, k.model_gb), dev.min_size_factor)
    return (batches * m.fixed_s + k.ops * m.per_item_s) * sf


def floor(workload: Workload, fleet: Fleet, ref_model_gb: Mapping[str, float]) -> Floor:
    """The cost and energy floors of `workload` on its shared pool's classes
    (`ref_model_gb`: the model-size reference per kind, the fleet's and the scheduler
    config's, as the simulator uses)."""
    s = workload.settings
    ref = {**fleet.ref_model_gb, **ref_model_gb}
    pools = kind_pools(fleet)
    keys: dict[str, _Key] = {}
    seen: set[str] = set()
    requested = 0
    for inst in instances(workload):
        run = expand(workload, inst)
        for st in run.stages:
            k = keys.get(st.batch_key)
            if k is None:
                k = keys[st.batch_key] = _Key(st.kind, st.model or "", st.model_gb)
            for op in st.ops:
                requested += 1
                if op.key not in seen:
                    seen.add(op.key)
                    k.ops += 1
    classes = [fleet.classes[c] for c in s.fleet]
    cost = energy = fast_cost = fast_energy = 0.0
    pools_used: set[str] = set()
    per_model: list[dict[tuple[str, str], float]] = [{}, {}, {}]  # (model, class) -> GB
    for k in keys.values():
        if not k.ops:
            continue
        pool = pools.get(k.kind, "gpu")
        gpu_kind = pool == "gpu" and not s.cpu_runs_gpu_kinds
        devs = [
            d
            for d in classes
            if can_run(d, k.kind, k.model_gb) and (d.kind == pool or not gpu_kind)
        ]
        if not devs:
            continue
        pools_used.add(pool)
        secs = {d.name: _busy_s(d, k, ref) for d in devs}
        cheap = min(devs, key=lambda d: secs[d.name] * d.price_per_hour)
        frugal = min(devs, key=lambda d: secs[d.name] * d.watts_busy)
        fast = min(devs, key=lambda d: secs[d.name])
        cost += secs[cheap.name] * cheap.price_per_hour / 3600
        energy += secs[frugal.name] * frugal.watts_busy / 3.6e6
        fast_cost += secs[fast.name] * fast.price_per_hour / 3600
        fast_energy += secs[fast.name] * fast.watts_busy / 3.6e6
        if k.model:
            for i, d in enumerate((cheap, frugal, fast)):
                per_model[i][(k.model, d.name)] = k.model_gb
    # each model loaded once on each class that runs it; one cold start per pool
    load = [
        {(m, c): gb / max(fleet.classes[c].load_gbps, 1e-9) for (m, c), gb in per_model[i].items()}
        for i in range(3)
    ]
    cost += sum(t * fleet.classes[c].price_per_hour / 3600 for (_, c), t in load[0].items())
    energy += sum(t * fleet.classes[c].watts_busy / 3.6e6 for (_, c), t in load[1].items())
    fast_cost += sum(t * fleet.classes[c].price_per_hour / 3600 for (_, c), t in load[2].items())
    fast_energy += sum(t * fleet.classes[c].watts_busy / 3.6e6 for (_, c), t in load[2].items())
    for pool in pools_used:
        cheapest = min(
            (d for d in classes if d.kind == pool), key=lambda d: d.price_per_hour, default=None
        )
        if cheapest is not None:
            cold = s.cold_start_s
            cost += cold * cheapest.price_per_hour / 3600
            energy += cold * cheapest.watts_idle / 3.6e6
            fast_cost += cold * cheapest.price_per_hour / 3600
            fast_energy += cold * cheapest.watts_idle / 3.6e6
    return Floor(
        requested_ops=requested,
        unique_ops=len(seen),
        cost_usd=cost,
        energy_kwh=energy,
        fastest_cost_usd=fast_cost,
        fastest_energy_kwh=fast_energy,
    )
