"""The discrete-event simulation of one policy over one workload.

Events (clock.Ev) are popped in virtual time; after all events of one instant are
handled, the policy gets one scheduling round if anything changed (new ready operators, a
worker freed or back). Operators become ready when their inputs are done (data-flow
triggering) and their stage's `after` stages are complete. Under content dedup a ready
operator whose key is already done completes at once, and one whose key is in flight
waits on that execution; otherwise every operator is its own execution.

Preemption: every allocated worker is killed at a seeded exponential rate
(`preempt_rate_per_h` per allocated worker-hour). Its running batch is lost (busy time up
to the kill still counts), the batch's operators are ready again at the front of their
queue (replayed: safe because results are keyed by content), and the worker's slot comes
back after `restart_s`, as a new allocation with a cold start.
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler import elastic
from flowmesh.engine.scheduler.elastic import fastest
from flowmesh.engine.scheduler.fleet import Fleet, LatencyModel
from flowmesh.engine.scheduler.policy import PolicyConfig, ReadyItem
from flowmesh.loadgen.sim.clock import Clock, Ev
from flowmesh.loadgen.sim.pool import Emulator, SimWorker, WorkerPool, can_run, kind_pools
from flowmesh.loadgen.sim.readyq import DONE, Exec, ReadyQueue
from flowmesh.loadgen.sim.workload import (
    Op,
    Stage,
    WorkflowInstance,
    WorkflowRun,
    Workload,
    expand,
    instances,
)

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.policies import SimPolicy

Progress = Callable[[int, int], None]


class Simulation:
    def __init__(
        self,
        workload: Workload,
        fleet: Fleet,
        policy: SimPolicy,
        config: PolicyConfig | None = None,
        progress: Progress | None = None,
    ) -> None:
        config = config or PolicyConfig()
        self.workload = workload
        self.settings = s = workload.settings
        self.fleet = fleet
        self.policy = policy
        self.progress = progress
        seed = workload.seed
        self.clock = Clock()
        # the shared pool's classes and caps (a policy may narrow them: an ablation)
        self.pool_classes = policy.pool_fleet(s) if policy.shared else {}
        self.pool = WorkerPool(fleet, self.pool_classes)
        self.ref_model_gb = {**fleet.ref_model_gb, **config.ref_model_gb}
        self.emu = Emulator(
            fleet,
            self.ref_model_gb,
            s.noise_sigma,
            s.profile_error,
            random.Random(f"{seed}:{policy.name}:noise"),
        )
        self.kill_rng = random.Random(f"{seed}:{policy.name}:kill")
        self.kind_pool = kind_pools(fleet)
        self.fastest = self._fastest()
        self.queues: dict[str, ReadyQueue] = {"": ReadyQueue()}
        self.dirty: dict[str, None] = {}
        self.inflight: dict[str, Exec] = {}
        self.done_keys: set[str] = set()
        self.instances: list[WorkflowInstance] = instances(workload)
        self.runs: dict[str, WorkflowRun] = {}
        self.arrivals: dict[str, float] = {}
        self.completions: dict[str, float] = {}
        self.arrival_log: list[float] = []  # arrival times, in order
        self._uid = 0
        self.aged_scale_at: dict[str, float] = {}  # autoscaler: last scale-up for age
        self.finished = False  # every workflow done: the pool may shrink to nothing
        self._wake_at = -1.0
        # the work accepted workflows still have to do per pool (not done, ready or not),
        # in seconds on the pool's fastest class: what the planner knows of the future
        self.pending_s: dict[str, float] = {"gpu": 0.0, "cpu": 0.0}
        # of it, the work not ready yet of stages whose inputs have all started (an
        # operator of each has been ready): what will be ready soon, what a forecast
        # release pre-warms CPU workers for
        self.soon_s: dict[str, float] = {"gpu": 0.0, "cpu": 0.0}
        self._soon_grew = False
        self._op_work: dict[tuple[str, float], float] = {}
        # counters
        self.requested = 0
        self.executed = 0
        self.hits_done = 0
        self.hits_inflight = 0
        self.replayed = 0
        self.batches = 0
        self.batch_ops = 0
        self.preemptions = 0
        self.lost_batches = 0
        self.events = 0
        self.rounds = 0
        self.loads = 0  # model loads
        # (kind, device class) -> [batches, operators, busy seconds]
        self.by_kind: dict[tuple[str, str], list[float]] = {}

    @property
    def queue(self) -> ReadyQueue:
        """The shared ready queue (shared policies)."""
        return self.queues[""]

    def _fastest(self) -> dict[str, LatencyModel]:
        """Per kind, the shared pool's fastest class (full batch, seconds per op) in the
        kind's pool: what the autoscaler measures a backlog in."""
        classes = self.pool_classes if self.policy.shared else self.fleet.classes
        pool = self.kind_pool
        return fastest(self.fleet, classes, lambda c, k: self.fleet.classes[c].kind == pool.get(k))

    def _check(self) -> None:
        """Every stage must be runnable somewhere in its pool, or the run would hang."""
        classes = (
            [self.fleet.classes[c] for c in self.pool_classes]
            if self.policy.shared
            else list(self.fleet.classes.values())
        )
        for tname, stages in self.workload.templates.items():
            for st in stages:
                pool = self.kind_pool.get(st.kind)
                gb = st.model_gb if st.model else 0.0
                if pool is None or not any(
                    c.kind == pool and can_run(c, st.kind, gb) for c in classes
                ):
                    raise ValueError(
                        f"{tname}.{st.name}: no {pool or '?'} class in the fleet runs "
                        f"{st.kind!r} with a {gb} GB model"
                    )

    # --- the loop -------------------------------------------------------------------

    def run(self) -> Simulation:
        with _no_cyclic_gc():
            return self._run()

    def _run(self) -> Simulation:
        self._check()
        for inst in self.instances:
            self.clock.at(inst.arrival, Ev.ARRIVE, inst)
        clock = self.clock
        while len(clock):
            ev, obj, token = clock.pop()
            now = clock.now
            self.events += 1
            if ev == Ev.DONE:
                self._on_done(obj, token, now)
            elif ev == Ev.ARRIVE:
                self._on_arrive(obj, now)
            elif ev == Ev.RELEASE:
                w: SimWorker = obj
                if w.allocated and w.batch is None and w.idle_token == token:
                    keep = self.policy.warm_minimum(self, w.device.name)
                    if not self.finished and self.pool.by_class.get(w.device.name, 0) <= keep:
                        if self.policy.warm_lowers:
                            # kept as the warm minimum, which the policy lowers when no
                            # work is pending: look again after an idle tail
                            self.clock.at(now + self.settings.idle_release_s, Ev.RELEASE, w, token)
                    else:
                        until = None if self.finished else self.policy.keep_idle(self, w, now)
                        if until is None:
                            self.pool.release(w, now)
                        else:
                            self.clock.at(until, Ev.RELEASE, w, token)
            elif ev == Ev.KILL:
                self._on_kill(obj, token, now)
            elif ev == Ev.RETURN:
                w = obj
                w.available = True
                self.pool.refresh(w)
                self.policy.on_return(self, w, now)
                self._keep_min(now)
                self.dirty[w.owner] = None
            elif ev == Ev.WAKE:
                self.dirty[""] = None
            nxt = clock.next_at()
            if nxt is not None and nxt <= now:
                continue
            if self._soon_grew:
                self._soon_grew = False
                self._keep_min(now)
            if self.dirty:
                scopes = list(self.dirty)
                self.dirty.clear()
                self.rounds += 1
                self.policy.round(self, now, scopes)
        for w in self.pool.workers:  # workflows that never finished (budgets): stop here
            self.pool.release(w, clock.now)
        return self

    # --- handlers -------------------------------------------------------------------

    def _on_arrive(self, inst: WorkflowInstance, now: float) -> None:
        run = expand(self.workload, inst)
        self.runs[run.wid] = run
        for st in run.stages:
            self.pending_s[self.kind_pool[st.kind]] += len(st.ops) * self.op_work(st)
        self.arrivals[run.wid] = now
        self.arrival_log.append(now)
        for st in run.stages:
            if not st.ops:
                self._started(st)
            if st.unstarted_inputs == 0 and not st.near:
                self._bring_near(st)
        self._keep_min(now)
        self.policy.on_arrival(self, run, now)
        for st in run.stages:
            if st.remaining == 0:
                for d in st.dependents:
                    d.after_left -= 1
        if run.remaining == 0:
            self._workflow_done(run, now)
            return
        hits = [
            op
            for op in run.ops
            if op.deps_left == 0 and op.stage.after_left == 0 and self._make_ready(op, now)
        ]
        self._finish(hits, now)

    def _make_ready(self, op: Op, now: float) -> bool:
        """Queue an operator whose inputs are done; True when it is already done (a dedup
        hit on a completed key)."""
        self.requested += 1
        st = op.stage
        st.readied += 1
        if st.near:
            self.soon_s[self.kind_pool[st.kind]] -= self.op_work(st)
        if not st.started:
            self._started(st)
        run = op.run
        if self.policy.dedup:
            key = op.key
            if key in self.done_keys:
                self.hits_done += 1
                return True
            e = self.inflight.get(key)
            if e is not None:
                e.waiters.append(op)
                self.hits_inflight += 1
                return False
        else:
            self._uid += 1
            key = f"{op.key}#{self._uid}"
        item = ReadyItem(
            key=key,
            # a policy that batches each workflow alone (an ablation) keys by workflow
            batch_key=f"{st.batch_key}@{run.wid}"
            if self.policy.batch_per_workflow
            else st.batch_key,
            kind=st.kind,
            executor=st.executor,
            model=st.model,
            model_gb=st.model_gb,
            input_bytes=st.input_bytes,
            tenant=run.tenant,
            workflow_id=run.wid,
            ready_at=now,
            deadline_at=math.inf
            if run.deadline_s is None
            else run.instance.arrival + run.deadline_s,
        )
        e = Exec(item, [op])
        if self.policy.dedup:
            self.inflight[key] = e
        scope = self.policy.scope(run)
        q = self.queues.get(scope)
        if q is None:
            q = self.queues[scope] = ReadyQueue()
        q.push(e)
        self.dirty[scope] = None
        return False

    def _finish(self, ops: list[Op], now: float) -> None:
        """Mark operators done and push what that makes ready (cache hits cascade)."""
        stack = list(ops)
        while stack:
            op = stack.pop()
            if op.done:
                continue
            op.done = True
            st = op.stage
            self.pending_s[self.kind_pool[st.kind]] -= self.op_work(st)
            run = op.run
            st.remaining -= 1
            run.remaining -= 1
            newly = [c for c in op.children if _dep_done(c)]
            if st.remaining == 0:
                for d in st.dependents:
                    d.after_left -= 1
                    if d.after_left == 0:
                        newly.extend(o for o in d.ops if o.deps_left == 0)
            for c in newly:
                if self._make_ready(c, now):
                    stack.append(c)
            if run.remaining == 0:
                self._workflow_done(run, now)

    def _workflow_done(self, run: WorkflowRun, now: float) -> None:
        run.completed_at = now
        self.completions[run.wid] = now
        self.policy.on_workflow_done(self, run, now)
        run.ops = []  # keep memory flat on long runs
        run.stages = []
        if self.progress is not None:
            self.progress(len(self.completions), len(self.instances))
        if len(self.completions) == len(self.instances) and self.policy.shared:
            self.finished = True
            for w in self.pool.workers:  # the warm minimum goes after its idle tail
                if w.allocated and w.batch is None:
                    self.clock.at(now + self.settings.idle_release_s, Ev.RELEASE, w, w.idle_token)

    def _started(self, st: Stage) -> None:
        """`st` has had an operator ready: the stages it feeds whose inputs have now all
        started are near."""
        st.started = True
        for d in st.feeds:
            d.unstarted_inputs -= 1
            if d.unstarted_inputs == 0 and not d.near:
                self._bring_near(d)

    def _bring_near(self, st: Stage) -> None:
        st.near = True
        soon = len(st.ops) - st.readied
        if soon:
            self.soon_s[self.kind_pool[st.kind]] += soon * self.op_work(st)
            self._soon_grew = True

    def _keep_min(self, now: float) -> None:
        """The shared pool's warm minimum (autoscale.min_workers, and what the policy
        pre-warms), while work remains."""
        if self.finished or not self.policy.shared:
            return
        mins = self.settings.min_workers
        for cls in [*mins, *(c for c in self.pool_classes if c not in mins)]:
            n = self.policy.warm_minimum(self, cls)
            spare = list(self.pool.unalloc.get(cls, {}).values())
            for w in spare[: max(0, n - self.pool.by_class.get(cls, 0))]:
                self.allocate(w, now)
                w.idle_since = now
                self.clock.at(now + self.settings.idle_release_s, Ev.RELEASE, w, w.idle_token)
                self.dirty[""] = None

    def _on_done(self, w: SimWorker, token: int, now: float) -> None:
        if token != w.batch_token or w.batch is None:
            return  # a batch lost to a preemption
        execs = w.batch
        w.batch = None
        w.busy_s += now - w.batch_start
        w.idle_token += 1
        self.pool.refresh(w)
        self.batches += 1
        self.batch_ops += len(execs)
        stat = self.by_kind.setdefault((execs[0].item.kind, w.device.name), [0, 0, 0.0])
        stat[0] += 1
        stat[1] += len(execs)
        stat[2] += now - w.batch_start
        if self.policy.shared:
            w.idle_since = now
            delay = self.policy.release_check_s(self)
            self.clock.at(now + delay, Ev.RELEASE, w, w.idle_token)
        self.policy.on_batch_done(self, w, execs)
        ops: list[Op] = []
        for e in execs:
            e.state = DONE
            self.executed += 1
            if self.policy.dedup:
                key = e.item.key
                self.inflight.pop(key, None)
                self.done_keys.add(key)
            ops.extend(e.waiters)
        self.dirty[w.owner] = None
        self._finish(ops, now)

    def _on_kill(self, w: SimWorker, gen: int, now: float) -> None:
        if gen != w.gen or not w.allocated:
            return
        self.preemptions += 1
        if w.batch is not None:
            self.lost_batches += 1
            w.busy_s += max(0.0, now - w.batch_start)
            scope = w.owner
            q = self.queues.get(scope)
            if q is None:
                q = self.queues[scope] = ReadyQueue()
            for e in reversed(w.batch):
                e.attempts += 1
                self.replayed += 1
                q.push(e, front=True)
            w.batch = None
            w.batch_token += 1
            self.dirty[scope] = None
        self.pool.release(w, now)
        w.available = False
        self.pool.refresh(w)
        self.clock.at(now + self.settings.restart_s, Ev.RETURN, w)

    # --- what policies call ---------------------------------------------------------

    def op_work(self, st: Stage) -> float:
        """One operator of `st` in seconds on its pool's fastest class (full batches,
        the model-size factor applied), as the autoscaler measures a backlog."""
        key = (st.kind, st.model_gb)
        w = self._op_work.get(key)
        if w is None:
            m = self.fastest.get(st.kind)
            w = (
                0.0
                if m is None
                else (m.fixed_s / max(m.max_batch, 1) + m.per_item_s)
                * self.emu.size_factor(st.kind, st.model_gb)
            )
            self._op_work[key] = w
        return w

    def allocate(self, w: SimWorker, now: float) -> None:
        self.pool.allocate(w, now, self.settings.cold_start_s)
        rate = self.settings.preempt_rate_per_h
        if rate > 0:
            self.clock.at(now + self.kill_rng.expovariate(rate / 3600.0), Ev.KILL, w, w.gen)

    def start_batch(
        self, w: SimWorker, execs: list[Exec], q: ReadyQueue, now: float, load: bool
    ) -> None:
        """Run `execs` (taken from `q`) on `w`: after its cold start, loading the model
        first when `load`; the DONE event comes at the emulated end."""
        assert w.allocated and w.batch is None and execs
        for e in execs:
            q.take(e)
        it = execs[0].item
        dev = w.device
        start = max(now, w.ready_at)
        exec_s = self.emu.exec_seconds(dev, it.kind, len(execs), it.model_gb)
        load_s = self.emu.load_seconds(dev, it.model_gb) if load else 0.0
        self.loads += load
        fetch_s = self.emu.fetch_seconds(dev, sum(e.item.input_bytes for e in execs))
        w.batch = execs
        w.batch_start = start
        w.exec_s = exec_s
        w.batch_token += 1
        w.idle_token += 1
        self.pool.refresh(w)
        self.clock.at(start + exec_s + load_s + fetch_s, Ev.DONE, w, w.batch_token)

    def arrival_rate(self, window_s: float) -> float:
        """Workflows per second over the last `window_s` (or since the first arrival,
        at least a cold start)."""
        return elastic.arrival_rate(
            self.arrival_log, self.clock.now, self.settings.cold_start_s, window_s
        )

    def wake_at(self, when: float) -> None:
        # a wake at this instant has been handled already (rounds run after every
        # event of the instant): a later one must be scheduled, not assumed pending
        if self._wake_at <= self.clock.now or when < self._wake_at:
            self._wake_at = when
            self.clock.at(when, Ev.WAKE)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a run: a run makes millions of small
    objects that live until it ends (operators, ready items, executions, events), and
    the collector's passes over them (2,515 in a 200-GPU bench-sim) were about a tenth
    of its time. Reference counting still frees what the run drops; cycles made during
    the run are left to the next collection after it (bench-sim's peak memory: 0.60
    GB, 0.59 with the collector on)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _dep_done(op: Op) -> bool:
    op.deps_left -= 1
    return op.deps_left == 0 and op.stage.after_left == 0
