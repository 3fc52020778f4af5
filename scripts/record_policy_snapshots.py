"""Record Policy.decide rounds (inputs and decisions) as a JSON fixture, so a rewrite of
the policy can be checked to make the same decisions (tests/test_scheduler_policy.py).

The rounds come from simulator runs of two workloads (multi-tenant, cold candidates,
held busy workers, model residency) and from the bench-scheduler generator at a small
scale. The fairness weight is 0 in the recorded config: the fairness term is changed on
purpose elsewhere; every other term must give the same decisions.

    .venv/bin/python scripts/record_policy_snapshots.py tests/data/policy_snapshots.json.gz
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import random
import sys
from pathlib import Path
from typing import Any

from flowmesh.configs import path as config_path
from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import load_fleet
from flowmesh.engine.scheduler.policy import (
    Policy,
    PolicyConfig,
    ReadyItem,
    WorkerState,
    load_policy_config,
)
from flowmesh.engine.scheduler.utility import Weights
from flowmesh.loadgen.sim import bench
from flowmesh.loadgen.sim.metrics import simulate
from flowmesh.loadgen.sim.workload import load_workload


def item_row(i: ReadyItem) -> list[Any]:
    return [getattr(i, f.name) for f in dataclasses.fields(ReadyItem)]


def worker_row(w: WorkerState) -> dict[str, Any]:
    return {
        "id": w.id,
        "device_class": w.device_class,
        "free_slots": w.free_slots,
        "resident": list(w.resident.items()),
        "executors": sorted(w.executors) if w.executors is not None else None,
        "models": sorted(w.models) if w.models is not None else None,
        "batch_caps": dict(w.batch_caps) if w.batch_caps is not None else None,
        "startup_s": w.startup_s,
        "busy_until": w.busy_until,
    }


def decision_row(d: Any) -> dict[str, Any]:
    return {
        "worker": d.worker,
        "items": [i.key for i in d.items],
        "load_model": d.load_model,
        "evict": list(d.evict),
        "seconds": d.seconds,
    }


def config_row(cfg: PolicyConfig) -> dict[str, Any]:
    return {
        "weights": dataclasses.asdict(cfg.weights),
        "linger_s": cfg.linger_s,
        "aging_scale_s": cfg.aging_scale_s,
        "spread_efficiency": cfg.spread_efficiency,
        "hold_s": cfg.hold_s,
    }


def main(dest: str) -> None:
    # the profile the test replays them on (a copy of the default when recorded)
    fleet = load_fleet(Path(__file__).resolve().parents[1] / "tests/data/fleet_recorded.yaml")
    base = load_policy_config(config_path("scheduler/default.yaml"))
    snaps: list[dict[str, Any]] = []
    original = Policy.decide

    def recording(self: Policy, items: Any, workers: Any, now: float, fair: Any = None) -> Any:
        snap = {
            "config": config_row(self.config),
            "now": now,
            "items": [item_row(i) for i in items],
            "workers": [worker_row(w) for w in workers],
            "fair": None
            if fair is None
            else {"usage": dict(fair.usage), "spent": dict(fair.spent_usd), "at": fair._at},
        }
        estimator = copy.deepcopy(self.estimator)
        out = original(self, items, workers, now, fair)
        snap["estimator"] = {
            f"{c}|{k}": [m.fixed_s, m.per_item_s, m.max_batch]
            for (c, k), m in estimator._cache.items()
        }
        snap["decisions"] = [decision_row(d) for d in out]
        if out and len(snap["items"]) <= 600:
            snaps.append(snap)
        return out

    Policy.decide = recording  # type: ignore[method-assign]
    for wl_name, hold in (("smoke", 0.0), ("rlhf-mix", 10.0), ("agentic", 0.0)):
        wl = load_workload(config_path(f"workloads/{wl_name}.yaml"))
        cfg = dataclasses.replace(
            base, weights=dataclasses.replace(base.weights, fairness=0.0), hold_s=hold
        )
        start = len(snaps)
        simulate(wl, fleet, cfg, "flowmesh")
        rng = random.Random(len(snaps))
        taken = snaps[start:]
        del snaps[start:]
        snaps.extend(rng.sample(taken, min(40, len(taken))))
    Policy.decide = original  # type: ignore[method-assign]
    # the bench generator at a small scale (all free, some models resident)
    cfg = dataclasses.replace(
        base, weights=Weights(**{**dataclasses.asdict(base.weights), "fairness": 0.0})
    )
    for seed in range(3):
        b = bench.bench_inputs(fleet, n_items=3000, n_workers=60, n_groups=60, seed=seed)
        items, layout = b
        workers = [WorkerState(wid, cls, 1, dict(res)) for wid, cls, res in layout]
        snap = {
            "config": config_row(cfg),
            "now": 120.0,
            "items": [item_row(i) for i in items],
            "workers": [worker_row(w) for w in workers],
            "fair": None,
            "estimator": {},
        }
        made = Policy(fleet, cfg).decide(items, workers, 120.0, FairShare())
        snap["decisions"] = [decision_row(d) for d in made]
        snaps.append(snap)
    with gzip.open(dest, "wt") as f:
        json.dump(snaps, f, separators=(",", ":"))
    print(len(snaps), "snapshots,", sum(len(s["decisions"]) for s in snaps), "decisions")


if __name__ == "__main__":
    main(sys.argv[1])
