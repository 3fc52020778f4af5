"""The elastic pool's decisions, made by the same code live and simulated.

The live autoscaler (engine/autoscaler.py) and the simulator's flowmesh policy
(loadgen/sim/policies.py, loadgen/sim/autoscale.py) both call these, so what the
simulator reports is what the engine would decide on the same backlog:

- `backlog_seconds`: a pool's waiting work in seconds on the fastest class that serves
  it (full batches, the model-size factor applied);
- `grow`: how many workers a pool may add this round (engine.scheduler.rightsize's
  break-even sizing, plus one for work no allocated class can run and one for work
  waiting past `max_wait_s`);
- `new_workers`: which classes those workers are, and what each would run first: the
  scheduling policy (engine.scheduler.policy.Policy, the utility function) over one
  cold candidate per class that may still grow, taking only its best choice and asking
  again, until the pool's allowance is used;
- `to_release`: which idle workers go (forecast release: keep only as many as the
  pool's remaining work needs within the break-even horizon, the most recently busy);
- `warm_minimum`: how much of a class's min_workers a forecast release keeps (all of it
  while it can be needed within a cold start, none between sparse workflows), over the
  arrival rate `arrival_rate` measures;
- `prewarm`: how many CPU workers a forecast release starts ahead of the work the
  running workflows' next stages will make ready, so that a CPU stage downstream of GPU
  work does not start its workers only once that work is ready and hold the GPUs behind
  it for a cold start.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import DeviceClass, Fleet, LatencyModel
from flowmesh.engine.scheduler.policy import Decision, Policy, ReadyGroup, WorkerState
from flowmesh.engine.scheduler.rightsize import idle_to_keep, scale_up


def can_run(device: DeviceClass, kind: str, model_gb: float) -> bool:
    """The class runs the kind and the model fits its memory."""
    return device.runs(kind) and model_gb <= device.memory_gb and not math.isnan(model_gb)


def kind_pools(fleet: Fleet) -> dict[str, str]:
    """The pool an operator kind belongs to: gpu when any GPU class runs it."""
    out: dict[str, str] = {}
    for kind in fleet.kinds:
        gpu = any(c.kind == "gpu" and c.runs(kind) for c in fleet.classes.values())
        out[kind] = "gpu" if gpu else "cpu"
    return out


def fastest(
    fleet: Fleet, classes: Iterable[str], serves: Callable[[str, str], bool]
) -> dict[str, LatencyModel]:
    """Per kind, the fastest of `classes` that `serves(class, kind)` (seconds per
    operator at a full batch, from the profile): what a backlog is measured in."""
    out: dict[str, LatencyModel] = {}
    names = list(classes)
    for kind in fleet.kinds:
        best: LatencyModel | None = None
        for c in names:
            dev = fleet.classes[c]
            if not dev.runs(kind) or not serves(c, kind):
                continue
            m = dev.latency[kind]
            if best is None or m.seconds(m.max_batch) / m.max_batch < best.seconds(
                best.max_batch
            ) / max(best.max_batch, 1):
                best = m
        if best is not None:
            out[kind] = best
    return out


def size_factor(ref_model_gb: Mapping[str, float], kind: str, model_gb: float) -> float:
    """A model's size relative to the kind's reference size (1 when either is unknown)."""
    ref = ref_model_gb.get(kind, 0.0)
    return model_gb / ref if model_gb > 0 and ref > 0 else 1.0


def backlog_seconds(m: LatencyModel, size: int, sf: float) -> float:
    """`size` waiting operators of one batch key in seconds on `m` (full batches)."""
    batches = math.ceil(size / max(m.max_batch, 1))
    return (batches * m.fixed_s + size * m.per_item_s) * sf


def grow(
    backlog_s: float,
    allocated: int,
    unallocated: int,
    startup_s: float,
    target_backlog_s: float,
    mode: str = "backlog",
    starving: bool = False,
    aged: bool = False,
) -> tuple[int, bool]:
    """Workers a pool may add, and whether the one added is for work waiting too long
    (`aged`; the caller then waits `max_wait_s` before the next such one). `mode`:
    "backlog" grows to backlog / target workers, "after-startup" counts only what the
    allocated workers will not have done when a new one is up. Work no allocated class
    can run (`starving`) always gets one."""
    if backlog_s <= 0:
        return 0, False
    target = max(target_backlog_s, 1e-9)
    if mode == "after-startup":
        k = scale_up(backlog_s, allocated, startup_s, target)
    else:
        k = math.ceil(backlog_s / target) - allocated
    by_age = False
    if starving:
        k = max(k, 1)
    elif aged and k <= 0:
        k = 1
        by_age = True
    return max(0, min(k, unallocated)), by_age


def new_workers(
    policy: Policy,
    groups: Callable[[int], list[ReadyGroup]],
    candidates: Callable[[], list[WorkerState]],
    pools_of_class: Mapping[str, frozenset[str]],
    pool_of: Callable[[Decision, WorkerState], str],
    allow: dict[str, int],
    busy: Sequence[WorkerState],
    now: float,
    fair: FairShare,
    take: Callable[[Decision, WorkerState], None],
) -> int:
    """Choose the class (and first batch) of each new worker the pools' `allow`ance
    admits: one Policy round over `candidates()` (one cold worker per class that may
    grow into a pool of `pools_of_class` with allowance left) and `busy` ones, of which
    only the best decision is taken (`take` allocates it; the caller's
    `groups(n_workers)` no longer shows its operators; `pool_of` says whose allowance
    it uses), then ask again.
    One candidate per class at a time: offering k of a class at once makes the policy
    spread small batches over workers the pool will not allocate. The round is scored
    on a copy of `fair`; a taken batch is charged to `fair` itself. Returns how many
    were taken."""
    taken = 0
    while any(n > 0 for n in allow.values()):
        cands = [
            w
            for w in candidates()
            if any(allow.get(p, 0) > 0 for p in pools_of_class[w.device_class])
        ]
        if not cands:
            break
        gs = groups(len(cands) + len(busy))
        if not gs:
            break
        decisions = policy.decide_groups(gs, [*cands, *busy], now, copy.deepcopy(fair))
        by_id = {w.id: w for w in cands}
        best: tuple[Decision, WorkerState] | None = None
        for d in decisions:
            w = by_id.get(d.worker)
            if w is None:
                continue
            if best is None and allow.get(pool_of(d, w), 0) > 0:
                best = (d, w)
            else:
                w.resident.clear()  # a candidate not taken: nothing was loaded
        if best is None:
            break
        d, w = best
        allow[pool_of(d, w)] -= 1
        n = len(d.items)
        for it in d.items:
            fair.charge(it.tenant, d.seconds / n, d.cost_usd / n, now)
        take(d, w)
        taken += 1
    return taken


def to_release(
    idle: Sequence[tuple[str, float]], pending_s: float, busy: int, horizon_s: float
) -> list[str]:
    """Of a pool's idle workers (id, idle since), those to release now: all but the
    `idle_to_keep` most recently busy (their models are the freshest)."""
    keep = idle_to_keep(pending_s, busy, len(idle), max(horizon_s, 1e-9))
    order = sorted(idle, key=lambda x: (x[1], x[0]), reverse=True)
    return [wid for wid, _ in order[keep:]]


ARRIVAL_WINDOW_S = 3600.0  # warm minimum: the arrival rate over the last hour


def arrival_rate(
    arrivals: Sequence[float], now: float, floor_s: float, window_s: float = ARRIVAL_WINDOW_S
) -> float:
    """Workflows per second over the last `window_s` of the sorted arrival times (or
    since the first one, over at least `floor_s`, a cold start)."""
    if not arrivals:
        return 0.0
    start = max(arrivals[0], now - window_s)
    n = len(arrivals) - bisect.bisect_left(arrivals, start)
    return n / max(now - start, floor_s, 1e-9)


def warm_minimum(n: int, work_for_it: bool, arrivals_per_s: float, cold_start_s: float) -> int:
    """Of a class's warm minimum `n`, what a forecast release keeps: all of it while the
    accepted workflows still have work for the class's pools (`work_for_it`: it is
    warm when their stages reach it), or while workflows arrive at least once per cold
    start; none between sparse workflows, when its last worker goes like any other."""
    if not n or work_for_it:
        return n
    return n if arrivals_per_s * cold_start_s >= 1.0 else 0


def prewarm(forecast_s: float, horizon_s: float) -> int:
    """Workers to hold for `forecast_s` seconds of work (on the pool's fastest class) that
    the running workflows will make ready soon: as many as a forecast release would keep
    idle for it (rightsize.idle_to_keep: one per `horizon_s`, the cold start), so a
    worker started now has at least its cold start's worth of work once it is up."""
    if forecast_s <= 0:
        return 0
    return math.ceil(forecast_s / max(horizon_s, 1e-9) - 1e-9)


def in_order(n: int, caps: Iterable[tuple[str, int]]) -> dict[str, int]:
    """`n` workers shared out over classes (name, cap) in the order given, each taking
    up to its cap: how a pool's pre-warm is split over its CPU classes, live and
    simulated."""
    out: dict[str, int] = {}
    for name, cap in caps:
        if n <= 0:
            break
        out[name] = take = min(cap, n)
        n -= take
    return out
