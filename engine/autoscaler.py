"""Elastic scale-out: add workers per device class while operators wait, retire them when
they have been idle a while.

Each round reads three things from the bus:
* the backlog per pool: operators on `fm.op.ready.<pool>` not yet assigned (the scheduler
  acks a ready message only once its batch is assigned, so the work-queue stream holds
  exactly the unassigned ones; KEDA's NATS JetStream scaler sees the same number as the
  `scheduler` consumer's lag);
* live workers from their heartbeats (KV fm_workers), and the batches each still holds
  (messages left on `fm.assign.<worker>`);
* the cost view: each managed class's $/h and throughput (ops/s per worker), seeded from
  the fleet profile the scheduler uses and refined from the batch times workers report.

`plan` (pure, so it is tested without processes) turns that into a target per class by
the simulator's own code (engine/scheduler/elastic.py): how many workers each pool may
add (its backlog in seconds on the fastest class, at `target_backlog_s` per worker;
`scale_up: after-startup` counts only what the running workers will not have done when a
new one is up), the class of each from the scheduling policy's utility over one cold
candidate per class (the batch a new worker would run first, scored on throughput, $,
energy and locality as the scheduler scores it), and, with `release: forecast`, which
idle workers the pool's remaining work (its backlog and the work soon ready, below)
still needs within a cold start. Never below
`min_workers` (with `forecast`, only while it can be needed within a cold start: while
running workflows have work for the class's pools, or while workflows arrive at least
once per cold start; elastic.warm_minimum, as simulated), never above `max_workers`.
With `forecast`, CPU classes are also started ahead of the CPU work the running
workflows will make ready soon (`soon_ready`: nodes whose input nodes have started,
their operators not created yet), one worker per cold start of it (elastic.prewarm, as
simulated), so a CPU stage after GPU work does not hold the GPUs idle through its
workers' cold start.
Growth is immediate (operators are waiting); with `release: fixed` a worker retires
only after `idle_grace_s` with nothing assigned and no batch finished, with `forecast` as
soon as the backlog no longer needs it (and at the latest after `idle_grace_s`); only the
provider's idle ones, so a busy worker is never stopped. A retired worker stops
gracefully (SIGTERM: it finishes its batch, says `stopping`, and the scheduler reclaims
anything still queued for it), so no work is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from flowmesh.engine.providers import Provider
from flowmesh.engine.scheduler import elastic
from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import (
    GENERIC,
    DeviceClass,
    Fleet,
    LatencyEstimator,
    LatencyModel,
)
from flowmesh.engine.scheduler.groups import group_ready
from flowmesh.engine.scheduler.policy import (
    RELEASE_MODES,
    SCALE_UP_MODES,
    Decision,
    Policy,
    PolicyConfig,
    ReadyGroup,
    ReadyItem,
    WorkerState,
)
from flowmesh.engine.workflow_book import Summary, WorkflowBook
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.messages import ReadyChunk, WorkerInfo, WorkflowStatus
from flowmesh.topics.operators import KINDS

log = structlog.get_logger("flowmesh.autoscaler")

ALL_POOLS = frozenset(k.pool for k in KINDS.values())
# ready chunks read per pool to count the operators they carry; a longer backlog is
# taken to hold chunks of the same mean size (a backlog that long scales to the limit)
CHUNKS_SAMPLED = 32


@dataclass(frozen=True)
class ClassPolicy:
    """A device class the autoscaler manages."""

    name: str
    min_workers: int = 0
    max_workers: int = 4
    price_per_hour: float = 0.05
    ops_per_s: float = 5.0  # a class no fleet profile knows: its speed until batches show it
    pools: frozenset[str] = ALL_POOLS  # ready pools its workers serve

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"class {self.name}: need 0 <= min_workers ({self.min_workers}) "
                f"<= max_workers ({self.max_workers})"
            )
        if self.ops_per_s <= 0 or self.price_per_hour < 0:
            raise ValueError(f"class {self.name}: ops_per_s must be > 0, price >= 0")


@dataclass(frozen=True)
class AutoscalerConfig:
    classes: tuple[ClassPolicy, ...]
    # a pool grows to about its backlog / this many workers (seconds of waiting work on
    # its fastest class per worker): a new worker is worth its cold start and idle tail
    # only for that much queued work (the simulator's autoscale.target_backlog_s)
    target_backlog_s: float = 30.0
    startup_s: float = 30.0  # a new worker's cold start: the break-even horizon
    idle_grace_s: float = 30.0  # fixed release: idle this long before a worker may retire
    release: str = "fixed"  # or "forecast" (engine.scheduler.elastic.to_release)
    scale_up: str = "backlog"  # or "after-startup" (engine.scheduler.rightsize.scale_up)
    tick_s: float = 2.0
    max_step: int = 4  # most workers added to one class in one round
    dead_after_s: float = 5.0  # a heartbeat older than this is not a live worker
    model_gb: float = 1.0  # the size of a model no worker has announced (as the scheduler)

    def __post_init__(self) -> None:
        if self.release not in RELEASE_MODES:
            raise ValueError(f"release must be one of {', '.join(RELEASE_MODES)}")
        if self.scale_up not in SCALE_UP_MODES:
            raise ValueError(f"scale_up must be one of {', '.join(SCALE_UP_MODES)}")
        if self.target_backlog_s <= 0 or self.startup_s < 0:
            raise ValueError("target_backlog_s must be > 0 and startup_s >= 0")


@dataclass(frozen=True)
class WorkerObs:
    worker: str
    device_class: str
    pools: frozenset[str]
    outstanding: int  # batches assigned to it and not acked yet
    idle_for: float  # seconds with nothing assigned and no batch finished


@dataclass(frozen=True)
class Snapshot:
    backlog: Mapping[str, int]  # pool -> operators waiting for a worker
    workers: tuple[WorkerObs, ...]  # live, not stopping
    replicas: Mapping[str, int]  # class -> what its provider runs or is starting
    # running workflows, counted when no worker runs at all (and for a forecast release's
    # warm minimum): the planner cannot key
    # a workflow's operators (their keys hold the executor's version) before some worker
    # has advertised its executors, so an empty fabric shows no backlog to scale on
    running_workflows: int = 0
    # pool -> the waiting operators read from the head of its backlog (all of them when
    # it is short); the rest are taken to look like these
    ready: Mapping[str, tuple[ReadyItem, ...]] = field(default_factory=dict)
    # read only for a forecast release with a warm minimum: the pools the running
    # workflows still have work for (stages not reached yet included), and workflows
    # submitted per second lately
    work_pools: frozenset[str] = frozenset()
    arrivals_per_s: float = 0.0
    # read only for a forecast release: operator kind -> operators the running workflows
    # will make ready soon (of nodes whose input nodes have all started, those not
    # created yet): idle workers are kept for them, CPU classes pre-warmed
    soon: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    device_class: str
    current: int
    target: int
    retire: tuple[str, ...]
    reason: str


def operators_in(chunks: int, head: Sequence[bytes]) -> int:
    """Operators waiting on one ready subject: the bus counts messages, and each is a
    chunk of up to 256 operators. `head` holds the first few chunks; the rest are assumed
    to be of their mean size."""
    if chunks <= 0 or not head:
        return 0
    ops = 0
    for data in head:
        try:
            ops += len(codec.decode(data, ReadyChunk).items)
        except codec.DecodeError:
            ops += 1  # the scheduler dead-letters it; it weighs as one here
    return math.ceil(ops * chunks / len(head))


def ready_items(
    head: Sequence[bytes], now: float, sizes: Mapping[str, float], default_gb: float
) -> list[ReadyItem]:
    """The operators of a pool's head chunks as the policy sees them (as the live
    scheduler builds them: engine/scheduler/live.py)."""
    out: list[ReadyItem] = []
    for data in head:
        try:
            chunk = codec.decode(data, ReadyChunk)
        except codec.DecodeError:
            continue
        spec = chunk.spec
        gb = sizes.get(spec.model, default_gb) if spec.model else 0.0
        out.extend(
            ReadyItem(
                key=it.key,
                batch_key=chunk.batch_key,
                kind=spec.kind,
                executor=f"{spec.executor}@{spec.version}",
                model=spec.model,
                model_gb=gb,
                input_bytes=it.input_bytes,
                tenant=it.tenant,
                workflow_id=it.workflow_id,
                ready_at=now,
            )
            for it in chunk.items
        )
    return out


def soon_ready(st: WorkflowStatus) -> Counter[str]:
    """Per operator kind, the operators of a running workflow soon ready: of each node
    not complete whose input nodes have all started (created an operator, or are
    complete), those not created yet. A per-record node is taken to have as many
    operators as the largest of its inputs, any other node one: the planner creates a
    per-record node's operators as its inputs' records are done, another node's one
    operator once they are all complete. The simulator's `soon_s`, as the live side
    sees it."""
    out: Counter[str] = Counter()
    for ns in st.nodes.values():
        if ns.spec is None or ns.complete:
            continue
        ups = [st.nodes[i] for i in ns.spec.inputs if i in st.nodes]
        if not ups or not all(u.total > 0 or u.complete for u in ups):
            continue
        kind = KINDS.get(ns.spec.op)
        expected = max(u.total for u in ups) if kind is None or kind.fanout == "record" else 1
        if expected > ns.total:
            out[ns.spec.op] += expected - ns.total
    return out


def summarize(st: WorkflowStatus) -> Summary:
    """What a round uses of one workflow's status."""
    running = st.state == "running"
    pools = frozenset(
        pool_of_kind(ns.spec.op)
        for ns in st.nodes.values()
        if running and ns.spec is not None and not ns.complete
    )
    return Summary(st.submitted_at, running, pools, soon_ready(st) if running else Counter())


def pool_of_kind(kind: str) -> str:
    """The ready pool an operator kind is published to."""
    k = KINDS.get(kind)
    return k.pool if k is not None else "cpu"


def fleet_for(classes: Sequence[ClassPolicy], fleet: Fleet | None) -> Fleet:
    """The fleet the autoscaler's policy scores: the profile's classes it manages, and
    for a class no profile knows one priced as configured, at `ops_per_s` for every
    operator kind (the estimator corrects it from the batches its workers report)."""
    base = fleet or Fleet(classes={}, kinds=())
    out = dict(base.classes)
    for c in classes:
        if c.name in out:
            continue
        per = 1.0 / c.ops_per_s
        every = set(KINDS) | set(base.kinds)
        out[c.name] = DeviceClass(
            name=c.name,
            kind="gpu" if c.pools == frozenset({"gpu"}) else "cpu",
            price_per_hour=c.price_per_hour,
            watts_busy=100.0,
            watts_idle=30.0,
            memory_gb=64.0,
            load_gbps=4.0,
            net_gbps=1.0,
            latency=dict.fromkeys(every, LatencyModel(0.0, per, GENERIC.max_batch)),
        )
    kinds = tuple(sorted({k for d in out.values() for k in d.latency}))
    return replace(base, classes=out, kinds=kinds)


def plan(
    snap: Snapshot,
    config: AutoscalerConfig,
    policy: Policy,
    now: float = 0.0,
    fair: FairShare | None = None,
) -> list[Step]:
    """What to change this round; classes already right are left out. The decisions
    are engine.scheduler.elastic's, the simulator's."""
    fleet = policy.fleet
    classes = {c.name: c for c in config.classes}
    replicas = {c: snap.replicas.get(c, 0) for c in classes}

    def serves(cls: str, kind: str) -> bool:
        return pool_of_kind(kind) in classes[cls].pools

    fast = elastic.fastest(fleet, classes, serves)
    ref = {**fleet.ref_model_gb, **policy.config.ref_model_gb}
    allow: dict[str, int] = {}
    for pool, items in sorted(snap.ready.items()):
        waiting = snap.backlog.get(pool, 0)
        if not items or waiting <= 0:
            continue
        sizes = Counter(it.batch_key for it in items)
        heads = {it.batch_key: it for it in items}
        secs = 0.0
        for bk, size in sizes.items():
            it = heads[bk]
            if it.kind in fast:
                sf = elastic.size_factor(ref, it.kind, it.model_gb)
                secs += elastic.backlog_seconds(fast[it.kind], size, sf)
        secs *= waiting / len(items)  # the unread rest looks like the head
        serving = [c for c in classes if pool in classes[c].pools]
        starving = not any(
            replicas[c] > 0 and elastic.can_run(fleet.classes[c], it.kind, it.model_gb)
            for it in heads.values()
            for c in serving
        )
        allow[pool], _ = elastic.grow(
            secs,
            sum(replicas[c] for c in serving),
            sum(max(0, classes[c].max_workers - replicas[c]) for c in serving),
            config.startup_s,
            config.target_backlog_s,
            config.scale_up,
            starving,
        )
    added: Counter[str] = Counter()
    taken: set[str] = set()
    reasons: dict[str, str] = {}

    def candidates() -> list[WorkerState]:
        return [
            WorkerState(f"new:{c}:{added[c]}", c, 1)
            for c, cp in classes.items()
            if replicas[c] + added[c] < cp.max_workers and added[c] < config.max_step
        ]

    # operators past the head not read; once the head is spoken for, they are taken
    # to look like it: [how many, whether the head is being read again]
    unread: list[int] = [sum(snap.backlog.values()) - sum(len(v) for v in snap.ready.values()), 0]

    def groups(_n: int) -> list[ReadyGroup]:
        left = [it for items in snap.ready.values() for it in items if it.key not in taken]
        if not left and unread[0] > 0:
            taken.clear()
            unread[1] = 1
            left = [it for items in snap.ready.values() for it in items]
        return group_ready(left)

    def take(d: Decision, w: WorkerState) -> None:
        added[w.device_class] += 1
        if unread[1]:
            unread[0] -= len(d.items)
        taken.update(it.key for it in d.items)
        reasons.setdefault(
            w.device_class, f"{sum(snap.backlog.values())} operators waiting ({d.items[0].kind})"
        )

    if any(allow.values()):
        elastic.new_workers(
            policy,
            groups,
            candidates,
            {c: cp.pools for c, cp in classes.items()},
            lambda d, w: pool_of_kind(d.items[0].kind),
            allow,
            [],
            now,
            fair or FairShare(policy.config.tenants),
            take,
        )
    nothing_runs = not snap.workers and not any(replicas.values())
    if snap.running_workflows and nothing_runs and not added:
        # one worker, of the first class listed that may start, to get planning going:
        # no operator is keyed yet, so there is nothing to score
        first = next((c for c, cp in classes.items() if cp.max_workers > 0), None)
        if first is not None:
            added[first] = 1
            reasons[first] = f"{snap.running_workflows} workflows and no worker"
    prewarm = _prewarm(snap, config, fleet, fast) if config.release == "forecast" else {}
    steps = []
    for name, c in classes.items():
        current = replicas[name]
        floor = c.min_workers
        if config.release == "forecast":
            floor = elastic.warm_minimum(
                floor, bool(snap.work_pools & c.pools), snap.arrivals_per_s, config.startup_s
            )
            floor = max(floor, prewarm.get(name, 0))
        # release is decided on the round's state before growth, as the simulator's
        # release checks are: an idle worker past its grace goes even while another
        # class (or a new one of its own) is started for work it does not take
        retire = _to_retire(snap, config, c, fast, ref, now)
        retire = retire[: max(0, current + added[name] - floor)]
        target = max(floor, current + added[name] - len(retire))
        target = min(target, current + config.max_step)
        if target == current and not retire:
            continue
        if added[name] or target > current:
            why = reasons.get(name, f"min_workers {c.min_workers}")
            if not added[name] and prewarm.get(name, 0) > c.min_workers:
                why = f"{sum(snap.soon.values())} operators soon ready (pre-warm)"
        elif config.release == "forecast":
            why = "idle, not needed by the backlog within a cold start"
        else:
            why = f"idle for {config.idle_grace_s:g}s or more"
        steps.append(Step(name, current, target, tuple(retire), why))
    return steps


def soon_seconds(
    soon: Mapping[str, int], fast: Mapping[str, LatencyModel], pools: Iterable[str]
) -> float:
    """The operators soon ready (kind -> how many) of `pools`, in seconds on each kind's
    fastest class (full batches; a model's size is not known before its operators are)."""
    wanted = set(pools)
    return sum(
        elastic.backlog_seconds(fast[kind], n, 1.0)
        for kind, n in soon.items()
        if n > 0 and kind in fast and pool_of_kind(kind) in wanted
    )


def _prewarm(
    snap: Snapshot, config: AutoscalerConfig, fleet: Fleet, fast: Mapping[str, LatencyModel]
) -> dict[str, int]:
    """Per CPU class, its share of elastic.prewarm over the CPU work soon ready (the
    classes in config order, each up to its max_workers), as the simulator's flowmesh
    policy: a CPU stage after GPU work has its workers up when its operators are ready,
    not a cold start later with the GPUs held idle behind it."""
    n = elastic.prewarm(soon_seconds(snap.soon, fast, {"cpu"}), config.startup_s)
    cpu = (
        (c.name, c.max_workers)
        for c in config.classes
        if "cpu" in c.pools and fleet.classes[c.name].kind == "cpu"
    )
    return elastic.in_order(n, cpu)


def _to_retire(
    snap: Snapshot,
    config: AutoscalerConfig,
    c: ClassPolicy,
    fast: Mapping[str, LatencyModel],
    ref: Mapping[str, float],
    now: float,
) -> list[str]:
    """Idle workers of class `c` that may go, the longest idle first."""
    mine = [w for w in snap.workers if w.device_class == c.name]
    idle = [w for w in mine if w.outstanding == 0]
    if config.release == "fixed":
        go = [
            w
            for w in idle
            if w.idle_for >= config.idle_grace_s
            and not any(snap.backlog.get(p, 0) for p in w.pools)
        ]
        return [w.worker for w in sorted(go, key=lambda w: -w.idle_for)]
    # forecast: keep only as many idle ones as the waiting work of the class's pools, and
    # the work soon ready for them, needs within a cold start; never past idle_grace_s
    pending = soon_seconds(snap.soon, fast, c.pools)
    for pool in c.pools:
        items = snap.ready.get(pool, ())
        waiting = snap.backlog.get(pool, 0)
        if not items or waiting <= 0:
            continue
        secs = sum(
            elastic.backlog_seconds(
                fast[it.kind], 1, elastic.size_factor(ref, it.kind, it.model_gb)
            )
            for it in items
            if it.kind in fast
        )
        pending += secs * waiting / len(items)
    leave = set(
        elastic.to_release(
            [(w.worker, now - w.idle_for) for w in idle],
            pending,
            # the rest of the class's replicas: busy, or starting (they will be)
            max(0, snap.replicas.get(c.name, 0) - len(idle)),
            config.startup_s,
        )
    )
    leave |= {w.worker for w in idle if w.idle_for >= config.idle_grace_s}
    return [w.worker for w in sorted(idle, key=lambda w: -w.idle_for) if w.worker in leave]


def class_from_fleet(
    fleet: Fleet, name: str, min_workers: int, max_workers: int, **overrides: object
) -> ClassPolicy:
    """A ClassPolicy priced from the scheduler's fleet profile, serving the pools of
    the kinds it runs (its speed is the profile's, per kind, in the policy)."""
    dc = fleet.classes[name]
    rates = [m.max_batch / max(m.seconds(m.max_batch), 1e-9) for m in dc.latency.values()]
    pools = frozenset(KINDS[k].pool for k in dc.latency if k in KINDS) or ALL_POOLS
    base = ClassPolicy(
        name=name,
        min_workers=min_workers,
        max_workers=max_workers,
        price_per_hour=dc.price_per_hour,
        ops_per_s=min(rates) if rates else 5.0,
        pools=pools,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class Autoscaler:
    """The loop: observe, plan, call the provider. One per fabric."""

    bus: Bus
    provider: Provider
    config: AutoscalerConfig
    # the scheduler's fleet profile (None: only the configured classes, at ops_per_s)
    fleet: Fleet | None = None
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    _idle_since: dict[str, float] = field(default_factory=dict)
    _book: WorkflowBook | None = None  # the workflows' statuses, read as they change
    _batches: dict[str, int] = field(default_factory=dict)
    # workers this loop asked the provider to stop: they heartbeat until their batch is
    # done and their `stopping` beat lands, but they are no longer replicas, so a round
    # must neither count them nor retire them twice
    _retiring: set[str] = field(default_factory=set)
    history: list[Step] = field(default_factory=list)
    # record=True: every round's time, snapshot, steps and how many batch observations
    # the estimator had by then (`observed`): a live run's decisions, replayable
    record: bool = False
    rounds: list[tuple[float, Snapshot, list[Step], int]] = field(default_factory=list)
    observed: list[tuple[str, str, int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [c.name for c in self.config.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"device classes listed twice: {names}")
        self.fleet = fleet_for(self.config.classes, self.fleet)
        self.estimator = LatencyEstimator(self.fleet)
        self.policy = Policy(self.fleet, self.policy_config, self.estimator)
        self.fair = FairShare(self.policy_config.tenants)
        self._t0 = time.monotonic()

    async def observe(self) -> Snapshot:
        now = time.monotonic()
        ready = await self.bus.transport.ready_backlog(CHUNKS_SAMPLED)
        held = {
            subjects.worker_of_assign_subject(subj): n
            for subj, n in (await self.bus.transport.assigned_counts()).items()
        }
        managed = {c.name for c in self.config.classes}
        workers = []
        seen = set()
        sizes: dict[str, float] = {}
        listed = set()
        for _key, value, _rev in await self.bus.kv_items(streams.KV_WORKERS):
            try:
                info = codec.decode(value, WorkerInfo)
            except codec.DecodeError:
                continue  # the scheduler dead-letters bad heartbeats; not our job
            sizes.update(info.model_gb)
            listed.add(info.worker)
            if info.device_class not in managed or info.stopping or info.worker in self._retiring:
                continue
            if time.time() - info.sent_at > self.config.dead_after_s:
                continue
            seen.add(info.worker)
            self._learn(info)
            outstanding = held.get(info.worker, 0)
            finished = info.batches_done != self._batches.get(info.worker, info.batches_done)
            self._batches[info.worker] = info.batches_done
            if outstanding or finished:
                self._idle_since.pop(info.worker, None)
                idle_for = 0.0
            else:
                idle_for = now - self._idle_since.setdefault(info.worker, now)
            workers.append(
                WorkerObs(
                    info.worker, info.device_class, frozenset(info.pools), outstanding, idle_for
                )
            )
        for gone in set(self._idle_since) - seen:
            self._idle_since.pop(gone, None)
        for gone in set(self._batches) - seen:
            self._batches.pop(gone, None)
        self._retiring &= listed
        pool_name = len(subjects.READY_PREFIX) + 1
        backlog = {subj[pool_name:]: operators_in(n, head) for subj, (n, head) in ready.items()}
        items = {
            subj[pool_name:]: tuple(ready_items(head, now - self._t0, sizes, self.config.model_gb))
            for subj, (n, head) in ready.items()
            if n
        }
        replicas = {c.name: await self.provider.replicas(c.name) for c in self.config.classes}
        running, pools, rate, soon = 0, frozenset[str](), 0.0, Counter[str]()
        # a forecast release (its warm minimum, what it keeps idle, its CPU pre-warm)
        # reads the workflows
        forecast = self.config.release == "forecast"
        if forecast or (not workers and not any(replicas.values())):
            running, pools, rate, soon = await self._workflows()
        return Snapshot(backlog, tuple(workers), replicas, running, items, pools, rate, soon)

    async def _workflows(self) -> tuple[int, frozenset[str], float, Counter[str]]:
        """From the workflows' status entries (kept by a watcher, `WorkflowBook`): how
        many run, the pools their nodes not yet complete run in, workflows submitted per
        second lately, and per operator kind the operators soon ready (`soon_ready`)."""
        if self._book is None:
            self._book = WorkflowBook(self.bus, summarize)
        await self._book.refresh()
        n, pools, submitted, soon = self._book.totals()
        rate = elastic.arrival_rate(submitted, time.time(), self.config.startup_s)
        return n, pools, rate, soon

    def _learn(self, info: WorkerInfo) -> None:
        """A batch a worker finished since the last round refines its class's latency
        model, as the scheduler's does (divided by the model-size factor)."""
        prev = self._batches.get(info.worker)
        if prev is None or info.batches_done <= prev or info.last_batch_size <= 0:
            return
        gb = (
            info.model_gb.get(info.last_batch_model, self.config.model_gb)
            if info.last_batch_model
            else 0.0
        )
        if info.device_class not in self.policy.fleet.classes:
            return
        sf = self.policy.size_factor(info.last_batch_kind, gb, info.device_class)
        obs = (
            info.device_class,
            info.last_batch_kind,
            info.last_batch_size,
            info.last_batch_seconds / max(sf, 1e-9),
        )
        self.estimator.observe(*obs)
        if self.record:
            self.observed.append(obs)

    async def step(self) -> list[Step]:
        snap = await self.observe()
        now = time.monotonic() - self._t0
        steps = plan(snap, self.config, self.policy, now, self.fair)
        if self.record:
            self.rounds.append((now, snap, steps, len(self.observed)))
        for s in steps:
            c = next(c for c in self.config.classes if c.name == s.device_class)
            log.info(
                "scaling",
                device_class=s.device_class,
                current=s.current,
                target=s.target,
                retire=list(s.retire),
                reason=s.reason,
                usd_per_hour=round(s.target * c.price_per_hour, 4),
            )
            await self.provider.scale(s.device_class, s.target, s.retire)
            for wid in s.retire:
                self._idle_since.pop(wid, None)
            self._retiring.update(s.retire)
        self.history.extend(steps)
        return steps

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every tick_s until `stop` is set; a failing round (nats restarting,
        the provider's API down) is logged and retried, never fatal."""
        try:
            while not stop.is_set():
                try:
                    await self.step()
                except Exception as exc:
                    log.warning("autoscaler round failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.tick_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop watching the workflows' statuses."""
        if self._book is not None:
            await self._book.close()


def parse_classes(
    specs: Sequence[str], fleet: Fleet | None, default_max: int
) -> tuple[ClassPolicy, ...]:
    """CLI class specs: `NAME[:MIN:MAX]` (e.g. `cpu:1:4`); priced from the fleet profile
    when it knows the class, else the worker defaults."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (1, 3) or not subjects.is_token(parts[0]):
            raise ValueError(f"bad autoscale class {spec!r}: use NAME or NAME:MIN:MAX")
        try:
            lo, hi = (int(parts[1]), int(parts[2])) if len(parts) == 3 else (0, default_max)
        except ValueError:
            raise ValueError(f"bad autoscale class {spec!r}: MIN and MAX are integers") from None
        name = parts[0]
        if fleet is not None and name in fleet.classes:
            out.append(class_from_fleet(fleet, name, lo, hi))
        else:
            out.append(ClassPolicy(name=name, min_workers=lo, max_workers=hi))
    return tuple(out)
