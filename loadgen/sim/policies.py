"""The three ways of running the same workflows that the simulator compares.

- `flowmesh`: one shared elastic pool; content dedup of completed and in-flight
  operators; ready operators of every workflow grouped by batch key; the batch and the
  worker of every assignment chosen by engine.scheduler.policy.Policy (the object the
  live scheduler runs, not a copy), whose LatencyEstimator learns from every batch.
- `shared-fifo`: the same shared elastic pool, no dedup; the oldest ready operator's
  batch key goes to the first free worker that can run it (its pool's classes), a batch
  of that key only, up to the class's max batch.
- `isolated-dedicated` (was `isolated`; the name is still accepted): every workflow on
  its own dedicated workers (one per model it uses, or per model and kind, of the
  `isolated.gpu` class, plus one `isolated.cpu` worker for CPU kinds), allocated from its
  arrival to its completion, idle or not; no dedup, no batching across workflows;
  batching within the workflow, oldest batch key first, as a pipeline would. A generous
  baseline to beat: `isolated-lean` and `reference` (loadgen/sim/baselines.py) are the
  ones a competent user would run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler import elastic
from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import Fleet, LatencyEstimator
from flowmesh.engine.scheduler.groups import ReadyGroup
from flowmesh.engine.scheduler.policy import (
    Decision,
    Policy,
    PolicyConfig,
    ReadyItem,
    WorkerState,
)
from flowmesh.loadgen.sim.autoscale import allowance
from flowmesh.loadgen.sim.pool import SimWorker, can_run, ensure_resident
from flowmesh.loadgen.sim.readyq import Exec
from flowmesh.loadgen.sim.workload import Levers, SimSettings

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.simulator import Simulation
    from flowmesh.loadgen.sim.workload import Stage, WorkflowRun

POLICIES = ("flowmesh", "reference", "shared-fifo", "isolated-lean", "isolated-dedicated")
BASELINES = POLICIES[1:]
ALIASES = {"isolated": "isolated-dedicated"}
RIGHT_AFTER = 1e-3  # s: after the current instant's scheduling round
PENDING_EPS_S = 1e-6  # pending work below this is float residue: none
RECHECKS = 6  # forecast release: re-checks of a kept idle worker per break-even horizon


class SimPolicy:
    name = "base"
    dedup = False
    shared = True  # runs on the shared elastic pool
    batch_per_workflow = False  # the shared queue's batch keys carry the workflow
    warm_lowers = False  # warm_minimum may fall below the workload's min_workers

    def pool_fleet(self, settings: SimSettings) -> Mapping[str, int]:
        """The shared pool's classes and how many workers of each (the workload's)."""
        return settings.fleet

    def scope(self, run: WorkflowRun) -> str:
        """Which ready queue a workflow's operators go to ("": the shared one)."""
        return ""

    def on_arrival(self, sim: Simulation, run: WorkflowRun, now: float) -> None:
        pass

    def on_workflow_done(self, sim: Simulation, run: WorkflowRun, now: float) -> None:
        pass

    def on_batch_done(self, sim: Simulation, w: SimWorker, execs: list[Exec]) -> None:
        pass

    def on_return(self, sim: Simulation, w: SimWorker, now: float) -> None:
        pass

    def warm_minimum(self, sim: Simulation, cls: str) -> int:
        """Workers of `cls` the shared pool keeps allocated, idle or not, while the run
        lasts (the workload's autoscale.min_workers)."""
        return sim.settings.min_workers.get(cls, 0)

    def release_check_s(self, sim: Simulation) -> float:
        """How long after its batch an idle shared-pool worker is first considered for
        release (a fixed idle tail by default)."""
        return sim.settings.idle_release_s

    def keep_idle(self, sim: Simulation, w: SimWorker, now: float) -> float | None:
        """At a release check: None releases the idle worker now; a time keeps it until
        the next check then."""
        return None

    def round(self, sim: Simulation, now: float, scopes: list[str]) -> None:
        raise NotImplementedError


class FlowMeshPolicy(SimPolicy):
    name = "flowmesh"
    dedup = True

    def __init__(
        self,
        fleet: Fleet,
        config: PolicyConfig,
        max_groups: int | None = None,
        levers: Levers | None = None,
    ):
        self.levers = levers = levers or Levers()
        self.dedup = levers.dedup
        self.batch_per_workflow = not levers.batching
        if not levers.release:
            config = replace(config, release="fixed")
        self.warm_lowers = config.release == "forecast"
        self.fleet = fleet
        self.config = config
        self.estimator = LatencyEstimator(fleet)
        self.policy = Policy(fleet, config, self.estimator)
        self.fair = FairShare(config.tenants)
        self.max_groups = max_groups
        self.kind_maxb = {
            k: max((c.latency[k].max_batch for c in fleet.classes.values() if c.runs(k)), default=1)
            for k in fleet.kinds
        }
        self._executors: dict[str, frozenset[str] | None] = {}
        self.decide_calls = 0
        self.decide_s = 0.0  # wall time inside Policy.decide (not part of the results)
        self.decide_items = 0
        # the last groups' executions: batch key -> operator key -> execution (the
        # queue's, of every ready operator of the key)
        self._execs: dict[str, dict[str, Exec]] = {}

    def pool_fleet(self, settings: SimSettings) -> Mapping[str, int]:
        if self.levers.heterogeneity:
            return settings.fleet
        return one_gpu_class(self.fleet, settings)

    def round(self, sim: Simulation, now: float, scopes: list[str]) -> None:
        q = sim.queue
        busy = self._busy(sim, now) if q.total and self.config.hold_s > 0 else []
        if q.total and sim.pool.free:
            self._decide(sim, now, list(sim.pool.free.values()), busy)
        if q.total:
            self.grow(sim, now, busy)
        if self.config.linger_s > 0 and q.total:
            if sim.pool.free:
                sim.wake_at(now + self.config.linger_s)
            else:
                # the policy held a young group back from a new worker too (linger is
                # by age): come back when it is old enough, not at the next event,
                # which on an empty pool may be the next arrival (20 s on smoke)
                until = self._linger_ends(sim, now)
                if until is not None:
                    sim.wake_at(until)

    def _linger_ends(self, sim: Simulation, now: float) -> float | None:
        """When the first group still lingering (oldest operator younger than linger_s)
        stops lingering; None when none does."""
        q = sim.queue
        linger = self.config.linger_s
        ends = [end for bk in q.sizes if (end := q.head(bk).item.ready_at + linger) > now]
        return min(ends, default=None)

    def grow(self, sim: Simulation, now: float, busy: list[WorkerState]) -> int:
        """The elastic pool's round, by the live autoscaler's code
        (engine.scheduler.elastic): how many workers each pool may add, then the class
        and first batch of each; a chosen worker is allocated and starts its batch."""
        allow = allowance(sim, self.config.scale_up)
        if not any(allow.values()):
            return 0
        pools = {c: frozenset({d.kind}) for c, d in sim.fleet.classes.items()}
        by_id: dict[str, SimWorker] = {}

        def candidates() -> list[WorkerState]:
            out = []
            for ws in sim.pool.unalloc.values():
                if ws:
                    w = next(iter(ws.values()))
                    by_id[w.id] = w
                    out.append(self._state(sim, w))
            return out

        def take(d: Decision, state: WorkerState) -> None:
            w = by_id[state.id]
            sim.allocate(w, now)
            self._start(sim, w, d, now)

        return elastic.new_workers(
            self.policy,
            lambda n: self._groups(sim, n),
            candidates,
            pools,
            lambda d, w: sim.fleet.classes[w.device_class].kind,
            allow,
            busy,
            now,
            self.fair,
            take,
        )

    def warm_minimum(self, sim: Simulation, cls: str) -> int:
        """Forecast release: the warm minimum only while it can be needed within a cold
        start: while the accepted workflows still have work for the class's pool
        (allocated when one arrives, its cold start overlapping the upstream stages), or
        while workflows arrive at least once per cold start (the recent rate). Between
        sparse workflows the pool's last worker goes like any other. A CPU class also
        holds its share of the pre-warm for the CPU work soon ready (`prewarm`)."""
        n = sim.settings.min_workers.get(cls, 0)
        if self.config.release != "forecast":
            return n
        cold = sim.settings.cold_start_s
        if n:
            n = elastic.warm_minimum(
                n,
                sim.pending_s[sim.fleet.classes[cls].kind] > PENDING_EPS_S,
                sim.arrival_rate(elastic.ARRIVAL_WINDOW_S),
                cold,
            )
        return max(n, self.prewarm(sim, cls))

    def prewarm(self, sim: Simulation, cls: str) -> int:
        """`cls`'s share of elastic.prewarm over the CPU work soon ready: the pool's CPU
        classes take it in fleet order, each up to its cap. Only CPU workers are started
        ahead of their work: one costs a small part of the GPUs a late CPU stage holds
        idle behind it, and a GPU started early would be the dear idle it avoids."""
        if not self.levers.prewarm or sim.fleet.classes[cls].kind != "cpu":
            return 0
        soon = sim.soon_s["cpu"]
        if soon <= PENDING_EPS_S:
            return 0
        classes = sim.fleet.classes
        cpu = ((c, cap) for c, cap in sim.pool_classes.items() if classes[c].kind == "cpu")
        return elastic.in_order(elastic.prewarm(soon, sim.settings.cold_start_s), cpu).get(cls, 0)

    def release_check_s(self, sim: Simulation) -> float:
        if self.config.release == "forecast":
            return RIGHT_AFTER  # once this instant's round has had its chance to use it
        return sim.settings.idle_release_s

    def keep_idle(self, sim: Simulation, w: SimWorker, now: float) -> float | None:
        """Forecast release: keep the idle worker only while the accepted workflows'
        remaining work for its pool needs it within the break-even horizon (its cold
        start), never longer than the pool's idle_release_s; of several idle workers the
        most recently busy are kept (their models are the freshest)."""
        if self.config.release != "forecast":
            return None
        cap = w.idle_since + sim.settings.idle_release_s
        if now >= cap:
            return None
        idle = [x for x in sim.pool.free.values() if x.pool == w.pool and not x.owner]
        horizon = max(sim.settings.cold_start_s, RIGHT_AFTER)
        go = elastic.to_release(
            [(x.id, x.idle_since) for x in idle],
            sim.pending_s[w.pool],
            sim.pool.allocated[w.pool] - len(idle),
            horizon,
        )
        if w.id in go:
            return None
        return min(cap, now + horizon / RECHECKS)

    def _groups(self, sim: Simulation, n_workers: int) -> list[ReadyGroup]:
        """The shared queue's groups as the policy sees them (oldest first); the
        executions behind their operators are kept for `_start` (by batch key)."""
        q = sim.queue
        groups: list[ReadyGroup] = []
        execs: dict[str, dict[str, Exec]] = {}
        for bk in q.oldest(self.max_groups):
            # more than maxb x workers of one group cannot change this round
            limit = self.kind_maxb.get(q.head(bk).item.kind, 1) * n_workers
            group, execs[bk] = q.group(bk, limit)
            groups.append(group)
        groups.sort(key=_oldest)
        self._execs = execs
        return groups

    def _state(self, sim: Simulation, w: SimWorker, busy_until: float | None = None) -> WorkerState:
        """`w` as the policy sees it: free (one slot), or busy until `busy_until`. The
        worker's one WorkerState, refreshed: a round changes only its free slots and
        resident models (`w.resident` itself, shared)."""
        st = w.state
        if st is None:
            # candidates are offered without their cold start (startup_s): priced at
            # each class's $/h it makes the default weights pick the cheapest slow class
            # for a small backlog, which cost energy and p95 on rlhf-mix (loadgen/README.md)
            st = w.state = WorkerState(
                w.id, w.device.name, 1, w.resident, self._advertised(sim, w.device.name)
            )
        st.id = w.id  # the autoscaler replay renames workers
        st.free_slots = 0 if busy_until is not None else 1
        st.busy_until = busy_until
        st.resident = w.resident
        return st

    def _start(self, sim: Simulation, w: SimWorker, d: Decision, now: float) -> None:
        execs = [self._execs[it.batch_key][it.key] for it in d.items]
        model = d.items[0].model
        if not self.levers.packing and model and len(w.resident) > 1:
            # one model per GPU: the batch's model stays, the others go
            for m in [m for m in w.resident if m != model]:
                del w.resident[m]
        sim.start_batch(w, execs, sim.queue, now, load=d.load_model is not None)
        # what a live scheduler would know: its own estimate, not the emulated end
        w.expected_end = max(now, w.ready_at) + d.seconds

    def _decide(
        self, sim: Simulation, now: float, workers: list[SimWorker], busy: list[WorkerState]
    ) -> int:
        """One Policy.decide round over the ready groups, the free allocated `workers`
        and the `busy` workers that free soon (for the policy's hold); returns how many
        batches started."""
        groups = self._groups(sim, len(workers) + len(busy))
        states = [self._state(sim, w) for w in workers]
        t0 = time.perf_counter()
        decisions = self.policy.decide_groups(groups, [*states, *busy], now, self.fair)
        self.decide_s += time.perf_counter() - t0
        self.decide_calls += 1
        self.decide_items += sum(len(g.items) for g in groups)
        by_id = {w.id: w for w in workers}
        for d in decisions:
            self._start(sim, by_id[d.worker], d, now)
        return len(decisions)

    def _busy(self, sim: Simulation, now: float) -> list[WorkerState]:
        """The shared pool's busy workers expected to free within hold_s, as the policy
        sees them (no free slot, busy_until)."""
        horizon = now + self.config.hold_s
        return [
            self._state(sim, w, w.expected_end)
            for w in sim.pool.workers
            if w.batch is not None and not w.owner and now <= w.expected_end <= horizon
        ]

    def _advertised(self, sim: Simulation, cls: str) -> frozenset[str] | None:
        """The executors a worker of `cls` advertises: all its profile runs, except that
        CPU workers leave the GPU pool's kinds out unless cpu_runs_gpu_kinds."""
        if cls not in self._executors:
            dev = sim.fleet.classes[cls]
            if dev.kind == "gpu" or sim.settings.cpu_runs_gpu_kinds:
                self._executors[cls] = None
            else:
                self._executors[cls] = frozenset(
                    f"{k}@sim1" for k in dev.latency if sim.kind_pool.get(k) == "cpu"
                )
        return self._executors[cls]

    def on_batch_done(self, sim: Simulation, w: SimWorker, execs: list[Exec]) -> None:
        it = execs[0].item
        # the estimator models a reference-size model; the policy scales by model size
        sf = sim.emu.size_factor(it.kind, it.model_gb, w.device)
        self.estimator.observe(w.device.name, it.kind, len(execs), w.exec_s / sf)


class SharedFifoPolicy(SimPolicy):
    name = "shared-fifo"

    def round(self, sim: Simulation, now: float, scopes: list[str]) -> None:
        q = sim.queue
        if q.total and sim.pool.free:
            self._assign(sim, now, None)
        if q.total:
            allow = allowance(sim)
            if any(allow.values()):
                self._assign(sim, now, allow)

    def _assign(self, sim: Simulation, now: float, allow: dict[str, int] | None) -> None:
        q = sim.queue
        for bk in q.oldest():
            while bk in q.sizes:
                head = q.head(bk).item
                w = self._pick(sim, head, allow)
                if w is None:
                    break
                if allow is not None:
                    allow[w.pool] -= 1
                    sim.allocate(w, now)
                n = min(q.sizes[bk], w.device.latency[head.kind].max_batch)
                execs = q.first(bk, n)
                load = ensure_resident(w, head.model, head.model_gb)
                sim.start_batch(w, execs, q, now, load)
            if (allow is None and not sim.pool.free) or (
                allow is not None and not any(allow.values())
            ):
                return

    @staticmethod
    def _pick(sim: Simulation, it: ReadyItem, allow: dict[str, int] | None) -> SimWorker | None:
        pool = sim.kind_pool[it.kind]
        if allow is None:
            for w in sim.pool.free.values():
                if w.pool == pool and can_run(w.device, it.kind, it.model_gb):
                    return w
            return None
        if allow.get(pool, 0) <= 0:
            return None
        for cls, ws in sim.pool.unalloc.items():  # the workload's fleet order
            dev = sim.fleet.classes[cls]
            if ws and dev.kind == pool and can_run(dev, it.kind, it.model_gb):
                return next(iter(ws.values()))
        return None


class IsolatedPolicy(SimPolicy):
    name = "isolated-dedicated"
    shared = False

    def __init__(self, fleet: Fleet, gpu: str, cpu: str, per: str = "model") -> None:
        self.fleet = fleet
        self.gpu = gpu
        self.cpu = cpu
        self.per = per
        self.workers: dict[str, list[SimWorker]] = {}
        self._serve: dict[str, str] = {}  # batch key -> serving worker's key

    def scope(self, run: WorkflowRun) -> str:
        return run.wid

    def _serve_key(self, sim: Simulation, st: Stage) -> str:
        if sim.kind_pool[st.kind] == "cpu":
            return "cpu"
        if self.per == "model-kind" or not st.model:
            return f"{st.kind}:{st.model or ''}"
        return st.model

    def _device_for(self, sim: Simulation, st: Stage) -> str:
        pool = sim.kind_pool[st.kind]
        first = self.cpu if pool == "cpu" else self.gpu
        order = [first, *(c for c in self.fleet.classes if c != first)]
        for c in order:
            dev = self.fleet.classes[c]
            if dev.kind == pool and can_run(dev, st.kind, st.model_gb):
                return c
        raise ValueError(f"no {pool} class runs {st.kind} with a {st.model_gb} GB model")

    def on_arrival(self, sim: Simulation, run: WorkflowRun, now: float) -> None:
        # one dedicated worker per model (or model and kind), on a class that runs all
        # of the stages it serves
        needs: dict[str, list[Stage]] = {}
        for st in run.stages:
            key = self._serve_key(sim, st)
            self._serve[st.batch_key] = key
            needs.setdefault(key, []).append(st)
        ws = []
        for key, stages in needs.items():
            cls = self._device_for(sim, max(stages, key=lambda s: s.model_gb))
            dev = self.fleet.classes[cls]
            if not all(can_run(dev, s.kind, s.model_gb) for s in stages):
                raise ValueError(f"isolated: class {cls} cannot run all of {key}'s stages")
            w = SimWorker(f"{run.wid}/{key}", dev, owner=run.wid, serves=key)
            sim.pool.add(w)
            sim.allocate(w, now)
            ws.append(w)
        self.workers[run.wid] = ws

    def on_workflow_done(self, sim: Simulation, run: WorkflowRun, now: float) -> None:
        for w in self.workers.pop(run.wid, []):
            sim.pool.release(w, now)

    def on_return(self, sim: Simulation, w: SimWorker, now: float) -> None:
        if w.owner in self.workers:  # its workflow still runs: a replacement
            sim.allocate(w, now)

    def round(self, sim: Simulation, now: float, scopes: list[str]) -> None:
        for scope in scopes:
            ws = self.workers.get(scope)
            q = sim.queues.get(scope)
            if not ws or q is None or not q.total:
                continue
            for w in ws:
                if not w.free:
                    continue
                for bk in q.oldest():
                    if self._serve[bk] != w.serves:
                        continue
                    head = q.head(bk).item
                    n = min(q.sizes[bk], w.device.latency[head.kind].max_batch)
                    load = ensure_resident(w, head.model, head.model_gb)
                    sim.start_batch(w, q.first(bk, n), q, now, load)
                    break
                if not q.total:
                    break


def _oldest(g: ReadyGroup) -> float:
    return g.items[0].ready_at


def one_gpu_class(fleet: Fleet, settings: SimSettings) -> dict[str, int]:
    """The shared pool with every GPU slot of one class: `isolated.gpu` (the class a
    user would rent) when the pool has it, else the pool's first GPU class; CPU classes
    as they are."""
    gpus = [c for c in settings.fleet if fleet.classes[c].kind == "gpu"]
    if not gpus:
        return dict(settings.fleet)
    keep = settings.isolated.gpu if settings.isolated.gpu in gpus else gpus[0]
    out = {keep: sum(settings.fleet[c] for c in gpus)}
    out.update((c, n) for c, n in settings.fleet.items() if c not in gpus)
    return out


def make_policy(
    name: str, fleet: Fleet, config: PolicyConfig, sim_settings: SimSettings
) -> SimPolicy:
    if name == "flowmesh":
        return FlowMeshPolicy(fleet, config, sim_settings.max_groups, sim_settings.levers)
    if name == "shared-fifo":
        return SharedFifoPolicy()
    name = ALIASES.get(name, name)
    if name == "isolated-dedicated":
        iso = sim_settings.isolated
        return IsolatedPolicy(fleet, iso.gpu, iso.cpu, iso.per)
    from flowmesh.loadgen.sim.baselines import IsolatedLeanPolicy, ReferencePolicy

    if name == "isolated-lean":
        return IsolatedLeanPolicy(fleet)
    if name == "reference":
        return ReferencePolicy()
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
