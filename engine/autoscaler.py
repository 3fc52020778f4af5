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

`plan` (pure, so it is tested without processes) turns that into a target per class:
enough capacity to drain the backlog within `drain_s`, cheapest $ per operator first, a
class going past its `max_workers` spilling to the next one; never below `min_workers`.
Hysteresis: growth is immediate (operators are waiting), shrinking is not: a worker
retires only after `idle_grace_s` with nothing assigned and no batch finished, and only
the provider's idle ones, so a busy worker is never stopped. A retired worker stops
gracefully (SIGTERM: it finishes its batch, says `stopping`, and the scheduler reclaims
anything still queued for it), so no work is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import nats.js.errors
import structlog

from flowmesh.engine.providers import Provider
from flowmesh.engine.scheduler.fleet import Fleet
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
    ops_per_s: float = 5.0  # one worker's throughput before any batch is observed
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
    drain_s: float = 30.0  # enough workers to clear the backlog within this long
    idle_grace_s: float = 30.0  # idle this long before a worker may retire
    tick_s: float = 2.0
    max_step: int = 4  # most workers added to one class in one round
    dead_after_s: float = 5.0  # a heartbeat older than this is not a live worker


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
    # running workflows, counted only when no worker runs at all: the planner cannot key
    # a workflow's operators (their keys hold the executor's version) before some worker
    # has advertised its executors, so an empty fabric shows no backlog to scale on
    running_workflows: int = 0


@dataclass(frozen=True)
class Step:
    device_class: str
    current: int
    target: int
    retire: tuple[str, ...]
    reason: str


def cost_per_op(c: ClassPolicy, ops_per_s: float) -> float:
    """$ per operator on one worker of the class: the scheduler's cost term, per op."""
    return c.price_per_hour / 3600.0 / max(ops_per_s, 1e-9)


def desired(snap: Snapshot, config: AutoscalerConfig, speed: Mapping[str, float]) -> dict[str, int]:
    """Workers per class to drain each pool's backlog within drain_s, cheapest $ per
    operator first (ties: the faster class), each class within [min, max]."""
    want = {c.name: c.min_workers for c in config.classes}
    used = {c.name: 0.0 for c in config.classes}  # capacity already spoken for
    startable = [c for c in config.classes if c.max_workers > 0]
    nothing_runs = not snap.workers and not any(snap.replicas.values())
    if snap.running_workflows and nothing_runs and startable:
        # one worker, of the cheapest class, to get planning going
        first = min(startable, key=lambda c: (cost_per_op(c, speed[c.name]), c.name))
        want[first.name] = max(want[first.name], 1)
    for pool, waiting in sorted(snap.backlog.items()):
        if waiting <= 0:
            continue
        need = waiting / config.drain_s  # ops/s
        serving = [c for c in config.classes if pool in c.pools]
        serving.sort(key=lambda c: (cost_per_op(c, speed[c.name]), -speed[c.name]))
        for c in serving:
            if need <= 0:
                break
            rate = speed[c.name]
            # capacity of workers counted for other pools is not counted twice
            free = want[c.name] * rate - used[c.name]
            if free > 0:
                take = min(free, need)
                used[c.name] += take
                need -= take
            if need <= 0:
                break
            add = min(c.max_workers - want[c.name], math.ceil(need / rate))
            if add > 0:
                want[c.name] += add
                used[c.name] += min(add * rate, need)
                need -= add * rate
    return want


def plan(snap: Snapshot, config: AutoscalerConfig, speed: Mapping[str, float]) -> list[Step]:
    """What to change this round; classes already right are left out."""
    want = desired(snap, config, speed)
    steps = []
    for c in config.classes:
        current = snap.replicas.get(c.name, 0)
        target = want[c.name]
        if target > current:
            target = min(target, current + config.max_step)
            waiting = sum(n for p, n in snap.backlog.items() if p in c.pools)
            why = (
                f"{waiting} operators waiting"
                if waiting
                else f"{snap.running_workflows} workflows and no worker"
                if snap.running_workflows
                else f"min_workers {c.min_workers}"
            )
            steps.append(Step(c.name, current, target, (), why))
        elif target < current:
            # only workers idle past the grace period, emptiest-looking first
            idle = sorted(
                (
                    w
                    for w in snap.workers
                    if w.device_class == c.name
                    and w.outstanding == 0
                    and w.idle_for >= config.idle_grace_s
                    and not any(snap.backlog.get(p, 0) for p in w.pools)
                ),
                key=lambda w: -w.idle_for,
            )
            retire = tuple(w.worker for w in idle[: current - target])
            if retire:
                steps.append(
                    Step(
                        c.name,
                        current,
                        current - len(retire),
                        retire,
                        f"idle for {config.idle_grace_s:g}s or more",
                    )
                )
    return steps


def class_from_fleet(
    fleet: Fleet, name: str, min_workers: int, max_workers: int, **overrides: object
) -> ClassPolicy:
    """A ClassPolicy priced and sped from the scheduler's fleet profile: $/h as given
    there, throughput at full batches over the kinds it runs (the slowest, so a backlog
    of heavy operators is not under-provisioned)."""
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
    # learned ops/s per class: an exponential average of observed batches
    speed: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.3
    _idle_since: dict[str, float] = field(default_factory=dict)
    _batches: dict[str, int] = field(default_factory=dict)
    history: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [c.name for c in self.config.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"device classes listed twice: {names}")
        for c in self.config.classes:
            self.speed.setdefault(c.name, c.ops_per_s)

    async def observe(self) -> Snapshot:
        now = time.monotonic()
        js = self.bus.js
        ready = await js.stream_info(streams.STREAM_READY, subjects_filter=subjects.READY_ALL)
        backlog = {
            subj[len(subjects.READY_PREFIX) + 1 :]: await self._operators_in(
                subj, n, ready.state.first_seq
            )
            for subj, n in (ready.state.subjects or {}).items()
        }
        assign = await js.stream_info(streams.STREAM_ASSIGN, subjects_filter=subjects.ASSIGN_ALL)
        held = {
            subjects.worker_of_assign_subject(subj): n
            for subj, n in (assign.state.subjects or {}).items()
        }
        managed = {c.name for c in self.config.classes}
        workers = []
        seen = set()
        for _key, value, _rev in await self.bus.kv_items(streams.KV_WORKERS):
            try:
                info = codec.decode(value, WorkerInfo)
            except codec.DecodeError:
                continue  # the scheduler dead-letters bad heartbeats; not our job
            if info.device_class not in managed or info.stopping:
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
        replicas = {c.name: await self.provider.replicas(c.name) for c in self.config.classes}
        running = 0
        if not workers and not any(replicas.values()):
            running = await self._running_workflows()
        return Snapshot(backlog, tuple(workers), replicas, running)

    async def _running_workflows(self) -> int:
        n = 0
        for _key, value, _rev in await self.bus.kv_items(streams.KV_WF):
            try:
                if codec.decode(value, WorkflowStatus).state == "running":
                    n += 1
            except codec.DecodeError:
                continue
        return n

    async def _operators_in(self, subject: str, chunks: int, first_seq: int) -> int:
        """Operators waiting on one ready subject: the stream counts messages, and each
        is a chunk of up to 256 operators. The first CHUNKS_SAMPLED chunks are read; the
        rest are assumed to be of their mean size."""
        if chunks <= 0:
            return 0
        seen = ops = 0
        seq = first_seq
        while seen < min(chunks, CHUNKS_SAMPLED):
            try:
                msg = await self.bus.js.get_msg(
                    streams.STREAM_READY, seq=seq, subject=subject, next=True
                )
            except nats.js.errors.NotFoundError:
                break  # taken meanwhile: what was read is the backlog
            seen += 1
            seq = (msg.seq or seq) + 1
            try:
                ops += len(codec.decode(msg.data or b"", ReadyChunk).items)
            except codec.DecodeError:
                ops += 1  # the scheduler dead-letters it; it weighs as one here
        if seen == 0:
            return 0
        return math.ceil(ops * chunks / seen)

    def _learn(self, info: WorkerInfo) -> None:
        prev = self._batches.get(info.worker)
        if prev is None or info.batches_done <= prev or info.last_batch_seconds <= 0:
            return
        rate = info.last_batch_size / info.last_batch_seconds
        old = self.speed[info.device_class]
        self.speed[info.device_class] = (1 - self.alpha) * old + self.alpha * rate

    async def step(self) -> list[Step]:
        snap = await self.observe()
        steps = plan(snap, self.config, self.speed)
        for s in steps:
            c = next(c for c in self.config.classes if c.name == s.device_class)
            log.info(
                "scaling",
                device_class=s.device_class,
                current=s.current,
                target=s.target,
                retire=list(s.retire),
                reason=s.reason,
                ops_per_s=round(self.speed[c.name], 3),
                usd_per_op=cost_per_op(c, self.speed[c.name]),
                usd_per_hour=round(s.target * c.price_per_hour, 4),
            )
            await self.provider.scale(s.device_class, s.target, s.retire)
            for wid in s.retire:
                self._idle_since.pop(wid, None)
        self.history.extend(steps)
        return steps

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every tick_s until `stop` is set; a failing round (nats restarting,
        the provider's API down) is logged and retried, never fatal."""
        while not stop.is_set():
            try:
                await self.step()
            except Exception as exc:
                log.warning("autoscaler round failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.tick_s)


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
