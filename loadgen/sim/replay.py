"""A live autoscaler's recorded rounds, decided again by the simulator.

`Autoscaler(record=True)` (engine/autoscaler.py) keeps every round's snapshot (the
ready operators, the workers with their idle times, the replicas per class), its steps
and the batch durations its estimator had learned by then. `replay` rebuilds each round
as simulator state (a SimWorker per replica, the ready operators in the shared queue,
the estimator fed the same batches) and asks the simulator's flowmesh policy what it
would do: `FlowMeshPolicy.grow` (how many workers, of which class) and `keep_idle`
(which idle workers go). What the live side cannot see, the simulator is not told
either: its remaining work (`pending_s`) is the ready backlog and the work soon ready
the live autoscaler counts from the workflows' status (`Snapshot.soon`), not every
operator the workflows will have. Classes are taken to serve one pool each (the
pool of their device kind), as in the simulator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import msgspec

from flowmesh.engine.autoscaler import AutoscalerConfig, Snapshot, Step, WorkerObs, soon_seconds
from flowmesh.engine.scheduler import elastic
from flowmesh.engine.scheduler.fleet import Fleet
from flowmesh.engine.scheduler.policy import PolicyConfig, ReadyItem
from flowmesh.loadgen.sim.policies import FlowMeshPolicy
from flowmesh.loadgen.sim.pool import SimWorker
from flowmesh.loadgen.sim.readyq import Exec
from flowmesh.loadgen.sim.simulator import Simulation
from flowmesh.loadgen.sim.workload import SimSettings, Workload

Round = tuple[float, Snapshot, list[Step], int]


@dataclass(frozen=True)
class Decided:
    """One round's decisions: workers added per class, workers released."""

    added: dict[str, int]
    released: frozenset[str]


def live_decisions(steps: Sequence[Step]) -> Decided:
    added = {
        s.device_class: s.target - s.current + len(s.retire)
        for s in steps
        if s.target - s.current + len(s.retire) > 0
    }
    released = frozenset(w for s in steps for w in s.retire)
    return Decided(added, released)


def replay(
    rounds: Sequence[Round],
    observed: Sequence[tuple[str, str, int, float]],
    config: AutoscalerConfig,
    fleet: Fleet,
    policy_config: PolicyConfig,
) -> list[Decided]:
    """The simulator's decisions for each recorded round (`fleet`: the live
    autoscaler's, engine.autoscaler.fleet_for)."""
    settings = SimSettings(
        fleet={c.name: c.max_workers for c in config.classes},
        cold_start_s=config.startup_s,
        idle_release_s=config.idle_grace_s,
        target_backlog_s=config.target_backlog_s,
        min_workers={c.name: c.min_workers for c in config.classes},
        noise_sigma=0.0,
        cpu_runs_gpu_kinds=True,  # live workers advertise their executors, not a pool
    )
    workload = Workload("replay", 0, settings, {}, {}, ())
    # the simulator's policy reads its release mode from the PolicyConfig, the live
    # autoscaler from its own config: replayed with the live one (with PolicyConfig's
    # default, "fixed", every idle worker was released at once, even one just started
    # for waiting work)
    policy = FlowMeshPolicy(fleet, replace(policy_config, release=config.release))
    fed = 0
    out: list[Decided] = []
    for now, snap, _steps, n_obs in rounds:
        for obs in observed[fed:n_obs]:
            policy.estimator.observe(*obs)
        fed = max(fed, n_obs)
        out.append(_round(workload, fleet, policy, policy_config, config, now, snap))
    return out


def _round(
    workload: Workload,
    fleet: Fleet,
    policy: FlowMeshPolicy,
    policy_config: PolicyConfig,
    config: AutoscalerConfig,
    now: float,
    snap: Snapshot,
) -> Decided:
    sim = Simulation(workload, fleet, policy, policy_config)
    sim.clock.now = now
    live = {c: [w for w in snap.workers if w.device_class == c] for c in workload.settings.fleet}
    idle: list[SimWorker] = []
    for cls, n in snap.replicas.items():
        spare = list(sim.pool.unalloc.get(cls, {}).values())
        for i, w in enumerate(spare[:n]):
            sim.pool.allocate(w, now, 0.0)
            obs = live[cls][i] if i < len(live[cls]) else None
            if obs is not None and obs.outstanding == 0:
                w.id = obs.worker  # idle: released by its live name
                w.idle_since = now - obs.idle_for
                idle.append(w)
            else:
                w.batch = []  # busy, or still starting: not free
            sim.pool.refresh(w)
    sim.pool.free = {w.id: w for w in idle}
    for items in snap.ready.values():
        for it in items:
            sim.queue.push(Exec(it, []))
    # what the live side knows of the remaining work: the ready backlog
    ref = {**fleet.ref_model_gb, **policy_config.ref_model_gb}
    for pool, items in snap.ready.items():
        waiting = snap.backlog.get(pool, 0)
        if items and waiting:
            secs = sum(
                elastic.backlog_seconds(
                    sim.fastest[it.kind], 1, elastic.size_factor(ref, it.kind, it.model_gb)
                )
                for it in items
                if it.kind in sim.fastest
            )
            sim.pending_s[pool] = sim.pending_s.get(pool, 0.0) + secs * waiting / len(items)
    # and the work soon ready, as the live side counts it (engine.autoscaler.soon_ready)
    for pool in ("gpu", "cpu"):
        secs = soon_seconds(snap.soon, sim.fastest, {pool})
        sim.pending_s[pool] = sim.pending_s.get(pool, 0.0) + secs
        sim.soon_s[pool] = secs
    # release checks see the round's state before it grows (a RELEASE event and a
    # scheduling round at one instant: the event is handled first)
    released = frozenset(w.id for w in idle if _released(policy, sim, w, now))
    before = Counter(sim.pool.by_class)
    policy.grow(sim, now, [])
    added = {c: n - before[c] for c, n in sim.pool.by_class.items() if n > before[c]}
    # the CPU classes pre-warmed for that work, as the simulator's warm minimum holds
    # them: started up to it, and not released below it (the longest idle go first)
    for cls in workload.settings.fleet:
        floor = policy.prewarm(sim, cls)
        if not floor:
            continue
        short = floor - sim.pool.by_class.get(cls, 0)
        if short > 0:
            added[cls] = added.get(cls, 0) + short
        going = sorted(
            (w for w in idle if w.id in released and w.device.name == cls),
            key=lambda w: (w.idle_since, w.id),
        )
        kept = going[max(0, before[cls] + added.get(cls, 0) - floor) :]
        released -= {w.id for w in kept}
    return Decided(added, released)


def _released(policy: FlowMeshPolicy, sim: Simulation, w: SimWorker, now: float) -> bool:
    """The simulator's release check of an idle worker, asked at this round: a forecast
    release asks it of every idle worker (each live round is a check); a fixed one only
    once the worker's idle tail (idle_release_s) is over."""
    due = policy.config.release == "forecast" or now >= w.idle_since + policy.release_check_s(sim)
    return due and policy.keep_idle(sim, w, now) is None


def dump_trace(
    rounds: Sequence[Round], observed: Sequence[tuple[str, str, int, float]]
) -> dict[str, Any]:
    """A recorded run as JSON-able data (tests/data/autoscale_trace.json)."""

    def snap(s: Snapshot) -> dict[str, Any]:
        return {
            "backlog": dict(s.backlog),
            "workers": [{**asdict(w), "pools": sorted(w.pools)} for w in s.workers],
            "replicas": dict(s.replicas),
            "running_workflows": s.running_workflows,
            "ready": {p: [msgspec.to_builtins(it) for it in items] for p, items in s.ready.items()},
            "soon": dict(s.soon),
        }

    return {
        "rounds": [
            {"now": now, "snapshot": snap(s), "steps": [asdict(st) for st in steps], "n_obs": n}
            for now, s, steps, n in rounds
        ],
        "observed": [list(o) for o in observed],
    }


def load_trace(
    data: Mapping[str, Any],
) -> tuple[list[Round], list[tuple[str, str, int, float]]]:
    rounds: list[Round] = []
    for r in data["rounds"]:
        s = r["snapshot"]
        snap = Snapshot(
            backlog=s["backlog"],
            workers=tuple(WorkerObs(**{**w, "pools": frozenset(w["pools"])}) for w in s["workers"]),
            replicas=s["replicas"],
            running_workflows=s["running_workflows"],
            ready={
                p: tuple(msgspec.convert(it, ReadyItem) for it in items)
                for p, items in s["ready"].items()
            },
            soon=s.get("soon", {}),  # traces recorded before the pre-warm have none
        )
        steps = [Step(**{**st, "retire": tuple(st["retire"])}) for st in r["steps"]]
        rounds.append((r["now"], snap, steps, r["n_obs"]))
    observed = [(o[0], o[1], int(o[2]), float(o[3])) for o in data["observed"]]
    return rounds, observed
