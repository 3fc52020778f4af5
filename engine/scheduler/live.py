"""The live scheduler: ready operators in, batch assignments out.

It holds a pool of ready operators (fetched from `fm.op.ready.>`, acked only once their
assignment is stored), groups compatible ones (same batch key) across workflows, and asks
the pure policy (`engine/scheduler/policy.py`, scoring with the utility function of
`engine/scheduler/utility.py`) which batch goes to which live worker with a free slot;
the simulator runs the same policy.

Capacity is read from the stream itself: the number of messages on `fm.assign.<worker>`
is exactly the number of batches a worker holds (work-queue retention drops a message
when the worker acks it), so a restarted scheduler knows every worker's load at once.
That read is a round trip to the server, so a round does not make it: it uses the last
read plus what was sent since (an upper bound: acks only lower it), and reads again
only when the read is old, or when those counts let it assign nothing and a worker has
finished a batch since.

A worker whose heartbeat stops (SIGKILL, lost host) is reclaimed: its consumer is
deleted, its unacked assignments are read back and their operators republished as ready.
Replay is safe because workers commit results by compare-and-set on the operator key.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import structlog

from flowmesh.engine import metrics
from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import Fleet, LatencyEstimator
from flowmesh.engine.scheduler.groups import ReadyPool
from flowmesh.engine.scheduler.policy import Policy, PolicyConfig, ReadyItem, WorkerState
from flowmesh.engine.supervise import guarded
from flowmesh.topics import Bus, streams, subjects
from flowmesh.topics.bus.transport import Consumer
from flowmesh.topics.messages import Assignment, ReadyChunk, ReadyOp, WorkerInfo, chunks_of
from flowmesh.topics.operators import pool_of

log = structlog.get_logger("flowmesh.scheduler")

FETCH_CHUNKS = 64  # ready chunks per fetch (each up to 256 operators)


@dataclass
class WorkerView:
    info: WorkerInfo
    last_seen: float  # monotonic


@dataclass
class Carrier:
    """A ready chunk's message: acked once every operator it carried is assigned."""

    msg: Any  # the delivery (nats Msg, Kafka or faust delivery)
    left: int  # its operators not yet assigned
    touched: float  # monotonic, last in-progress ack


@dataclass
class Waiting:
    """A ready chunk read past the pool's limit: not yet in the pool, its message kept
    claimed (in progress) like a carrier's."""

    msg: Any
    chunk: ReadyChunk
    wall: float  # wall clock when read, for aging
    seen: float  # monotonic, when read
    touched: float = 0.0  # monotonic, last in-progress ack

    def __post_init__(self) -> None:
        self.touched = self.touched or self.seen


@dataclass
class Held:
    op: ReadyOp
    carrier: Carrier
    ready_at: float  # wall clock, for aging
    more: bool = False  # the planner said more operators of its node are on the way


# How fast the arrival-rate estimate of a batch key forgets (seconds).
RATE_TAU_S = 2.0
# The longest a round trusts the assignment counts it read without reading them again.
COUNTS_MAX_AGE_S = 2.0


@dataclass
class Arrivals:
    """The observed arrival rate of one batch key: an exponentially decaying count of
    its operators, over RATE_TAU_S (operators per second)."""

    count: float = 0.0
    at: float = 0.0  # monotonic, last update

    def add(self, n: int, now: float) -> None:
        self.count = self.count * math.exp(-(now - self.at) / RATE_TAU_S) + n
        self.at = now

    def rate(self, now: float) -> float:
        return self.count * math.exp(-(now - self.at) / RATE_TAU_S) / RATE_TAU_S


def _left_behind(msg: Any) -> bool:
    """Whether ready chunks are waiting on the stream after `msg`: a JetStream delivery
    says how many; a delivery that does not say (Kafka, faust) counts as yes."""
    try:
        pending = msg.metadata.num_pending
    except Exception:  # not a JetStream delivery
        return True
    return not isinstance(pending, int) or pending > 0


class Scheduler:
    def __init__(
        self,
        bus: Bus,
        *,
        dead_after_s: float = 5.0,
        pool_limit: int = 20_000,
        overflow_limit: int = 200_000,
        tick_s: float = 0.02,
        fleet: Fleet | None = None,
        config: PolicyConfig | None = None,
        model_gb: float = 1.0,
    ) -> None:
        self.bus = bus
        self.dead_after_s = dead_after_s
        self.pool_limit = pool_limit
        # operators read past pool_limit, kept as chunks per tenant (decoded, about 200
        # bytes an operator) until the pool has room or their tenant holds little
        self.overflow_limit = overflow_limit
        self.tenant_floor = max(1, pool_limit // 16)
        self.overflow: dict[str, deque[Waiting]] = {}
        self.overflow_ops = 0
        self.held_by: Counter[str] = Counter()  # tenant -> operators in the pool
        self.tick_s = tick_s
        self.fleet = fleet or Fleet(classes={}, kinds=())
        self.config = config or PolicyConfig()
        self.estimator = LatencyEstimator(self.fleet)
        self.policy = Policy(self.fleet, self.config, self.estimator)
        self.fair = FairShare(self.config.tenants)
        # the size of a model no worker has announced (WorkerInfo.model_gb)
        self.model_gb = model_gb
        self.workers: dict[str, WorkerView] = {}
        self.pool: dict[str, Held] = {}  # operator key -> held ready operator
        # what the policy sees of them, grouped by batch key as they come and go (not
        # regrouped every round)
        self.ready = ReadyPool()
        self.carriers: dict[int, Carrier] = {}  # id -> chunk messages not yet acked
        self.arrivals: dict[str, Arrivals] = {}  # batch key -> its arrival rate
        self._warned: set[str] = set()
        self.started = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.assigned_batches = 0
        # worker -> when the batches assigned to it are expected to be done (the
        # policy's estimates, wall clock): lets the policy hold a batch for it
        self._busy_until: dict[str, float] = {}
        self.reclaimed_ops = 0
        # assignment subject -> batches not yet acked, as last read (None: never) plus
        # the batches sent since; `_sent` counts every batch sent, to add those a read
        # may have missed
        self._counts: dict[str, int] | None = None
        self._counts_at = 0.0  # monotonic, when read
        self._counts_stale = False  # a worker finished a batch since the read
        self._sent: Counter[str] = Counter()
        self._known_gb: dict[str, float] = {}  # model digest -> size a worker announced
        self._round_lock = asyncio.Lock()
        self._ready_behind = True  # the last fetch left ready chunks on the stream

    @property
    def held(self) -> int:
        return len(self.pool)

    @property
    def full(self) -> bool:
        """No room left for ready chunks, in the pool or in the overflow queues."""
        return self.held >= self.pool_limit and self.overflow_ops >= self.overflow_limit

    async def start(self) -> None:
        self.kv_workers = await self.bus.kv(streams.KV_WORKERS)
        self.psub = await self._ready_source()
        self._tasks = [
            asyncio.create_task(
                guarded("scheduler", "workers", self._watch_workers, self._stopping)
            ),
            asyncio.create_task(
                guarded("scheduler", "schedule", self._schedule_loop, self._stopping)
            ),
            asyncio.create_task(guarded("scheduler", "intake", self._intake_loop, self._stopping)),
            asyncio.create_task(
                guarded("scheduler", "liveness", self._liveness_loop, self._stopping)
            ),
        ]

    async def _ready_source(self) -> Consumer:
        """Where ready operators come from (engine/scheduler/faust_app.py feeds its own)."""
        return await self.bus.transport.ready_consumer()

    async def stop(self) -> None:
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- workers --------------------------------------------------------------------

    async def _watch_workers(self) -> None:
        seen = self.bus.reconnects
        watcher = await self.kv_workers.watchall()
        try:
            while not self._stopping.is_set():
                if self.bus.reconnects != seen:
                    # the watcher's consumer died with the server (a nats restart):
                    # watch again; its initial values re-announce every worker
                    seen = self.bus.reconnects
                    with contextlib.suppress(Exception):
                        await watcher.stop()
                    watcher = await self.kv_workers.watchall()
                try:
                    entry = await watcher.updates(timeout=1.0)
                except TimeoutError:
                    continue
                if entry is None:
                    continue  # end of the initial values
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    if entry.key in self.workers:
                        await self._reclaim(entry.key, reason="worker left")
                    continue
                info = await self.bus.decode_or_dead_letter(
                    "scheduler", f"$KV.{streams.KV_WORKERS}.{entry.key}", entry.value, WorkerInfo
                )
                if info is None:
                    continue
                # age by the sender's clock so a restarted scheduler does not take a
                # long-dead worker's last heartbeat for a fresh one
                age = max(0.0, time.time() - info.sent_at)
                prev = self.workers.get(info.worker)
                if (
                    prev is not None
                    and info.batches_done > prev.info.batches_done
                    and info.last_batch_size > 0
                    and info.device_class in self.fleet.classes
                ):
                    gb = (
                        info.model_gb.get(info.last_batch_model, self.model_gb)
                        if info.last_batch_model
                        else 0.0
                    )
                    sf = self.policy.size_factor(info.last_batch_kind, gb, info.device_class)
                    self.estimator.observe(
                        info.device_class,
                        info.last_batch_kind,
                        info.last_batch_size,
                        info.last_batch_seconds / max(sf, 1e-9),
                    )
                seen_at = time.monotonic() - age
                if prev is not None:
                    # never backwards: a re-created watcher replays the last value,
                    # which may predate the grace given after a reconnect
                    seen_at = max(seen_at, prev.last_seen)
                self.workers[info.worker] = WorkerView(info, seen_at)
                self._learn_model_sizes(info.model_gb)
                if (
                    prev is None
                    or info.batches_done != prev.info.batches_done
                    or info.slots != prev.info.slots
                ):
                    self._counts_stale = True  # a slot may be free now
                self._wake.set()
        finally:
            await watcher.stop()

    def _learn_model_sizes(self, announced: dict[str, float]) -> None:
        """A model size announced for the first time (or changed): held operators of that
        model that arrived before it was known, placed by the assumed `model_gb`, take it
        now (a ready operator read before the first heartbeat would otherwise go to a
        device its model does not fit)."""
        new = {d: gb for d, gb in announced.items() if self._known_gb.get(d) != gb}
        if not new:
            return
        self._known_gb.update(new)
        for key, held in self.pool.items():
            gb = new.get(held.op.spec.model or "")
            if gb is None:
                continue
            item = self.ready.remove(key)
            if item is not None:
                self.ready.add(replace(item, model_gb=gb))

    def live_workers(self) -> list[WorkerView]:
        now = time.monotonic()
        return [
            w
            for w in self.workers.values()
            if now - w.last_seen < self.dead_after_s and not w.info.stopping
        ]

    async def _liveness_loop(self) -> None:
        seen = self.bus.reconnects
        while not self._stopping.is_set():
            await asyncio.sleep(min(1.0, self.dead_after_s / 2))
            now = time.monotonic()
            if not self.bus.connected or self.bus.reconnects != seen:
                # we were cut off, so silence proves nothing: every worker gets a fresh
                # dead_after_s from now (one that really died is reclaimed after it)
                seen = self.bus.reconnects
                for w in self.workers.values():
                    w.last_seen = max(w.last_seen, now)
                continue
            for wid, w in list(self.workers.items()):
                if now - w.last_seen > self.dead_after_s:
                    await self._reclaim(wid, reason="heartbeat lost")
            # assignments held for workers this scheduler has never heard of (it
            # restarted after they died)
            if now - self.started > self.dead_after_s:
                for subject, count in (await self._read_counts()).items():
                    wid = subjects.worker_of_assign_subject(subject)
                    if count and wid not in self.workers:
                        await self._reclaim(wid, reason="unknown worker")

    async def _reclaim(self, wid: str, reason: str) -> None:
        """Take back every batch a dead worker holds and make its operators ready again."""
        view = self.workers.pop(wid, None)
        # the batch its last heartbeat said it was running (None: a worker this
        # scheduler never heard from, so any of them may have been running)
        running = view.info.running if view is not None else None
        if not subjects.is_token(wid):
            return  # not a worker id we could have assigned to
        n_ops = await self._take_back(wid, running)
        with contextlib.suppress(Exception):  # its heartbeat entry; TTL removes it anyway
            await self.kv_workers.delete(wid)
        self.reclaimed_ops += n_ops
        metrics.ops_reclaimed(n_ops)
        log.warning("worker reclaimed", worker=wid, reason=reason, ops=n_ops)

    async def _take_back(self, wid: str, running: str | None) -> int:
        """The worker's unacked assignments, re-published as ready; how many operators."""
        n_ops = 0

        async def republish(subject: str, data: bytes) -> None:
            nonlocal n_ops
            batch = await self.bus.decode_or_dead_letter("scheduler", subject, data, Assignment)
            if batch is not None:
                n_ops += await self._republish(batch, running)

        await self.bus.transport.take_back(wid, republish)
        return n_ops

    async def _republish(self, batch: Assignment, running: str | None) -> int:
        """A reclaimed batch's operators back on the ready pool. Every field is carried
        over (failures, max_attempts): a reclaim is a new delivery, not a failure. The
        batch that was running when its worker died counts a loss (`attempt`, which
        workers use to isolate and finally stop a record that kills every process that
        runs it); batches queued behind it never started and count nothing."""
        lost = running is None or running == batch.batch_id
        ops = batch.ops
        if lost:
            ops = [msgspec.structs.replace(op, attempt=op.attempt + 1) for op in ops]
        subject = subjects.ready(pool_of(batch.spec.kind))
        await self.bus.publish_many(
            [(subject, c, f"ready-{uuid.uuid4().hex}") for c in chunks_of(ops, len(ops))]
        )
        return len(ops)

    # --- scheduling -----------------------------------------------------------------

    async def _assigned_counts(self) -> dict[str, int]:
        return await self.bus.transport.assigned_counts()

    async def _read_counts(self) -> dict[str, int]:
        """The assignment counts read from the bus (one round trip), kept for the rounds
        after it. A batch sent while the read was on its way may be missing from it, so
        it is added (counted twice at worst: the counts stay an upper bound, and a
        worker is never sent more than its slots)."""
        sent = self._sent.copy()
        self._counts_stale = False
        read = await self._assigned_counts()
        counts = dict(read)
        for subject, n in self._sent.items():
            if n > sent[subject]:
                counts[subject] = counts.get(subject, 0) + n - sent[subject]
        self._counts, self._counts_at = counts, time.monotonic()
        return read

    async def _fill_pool(self, timeout: float = 0.05) -> int:
        """Ready chunks in: into the pool while it has room, and past `pool_limit` into
        per-tenant overflow queues (bounded by `overflow_limit` operators), from which
        `_promote` admits them tenant by tenant. Read in stream order and left there, one
        tenant's backlog would hide every other tenant's chunks behind it: a small
        workflow waited for a 92,651-operator one's chunks to drain (loadgen large)."""
        if self.full:
            return 0
        # nothing was left behind the last chunk read: one chunk, returned the moment
        # it comes (a JetStream fetch of many waits for the server's end-of-batch
        # answer after the first, and meanwhile this loop's other tasks run first)
        batch = FETCH_CHUNKS if self._ready_behind else 1
        try:
            msgs = await self.psub.fetch(batch, timeout=timeout)
        except TimeoutError:
            return 0
        self._ready_behind = _left_behind(msgs[-1]) if msgs else False
        now, wall = time.monotonic(), time.time()
        for msg in msgs:
            chunk = await self.bus.decode_or_dead_letter(
                "scheduler", msg.subject, msg.data, ReadyChunk
            )
            if chunk is None or not chunk.items:
                if chunk is None:
                    await msg.term()
                else:
                    await msg.ack()
                continue
            tenant = chunk.items[0].tenant
            self.overflow.setdefault(tenant, deque()).append(Waiting(msg, chunk, wall, now))
            self.overflow_ops += len(chunk.items)
        await self._promote()
        if msgs:
            self._wake.set()
        return len(msgs)

    async def _promote(self) -> None:
        """Chunks from the overflow queues into the pool: while the pool has room, the
        tenant holding the fewest operators first; past `pool_limit`, still any tenant
        holding fewer than `tenant_floor` (a small workflow is never stuck behind a
        backlog that filled the pool)."""
        while self.overflow:
            tenant = min(self.overflow, key=lambda t: self.held_by.get(t, 0))
            if self.held >= self.pool_limit and self.held_by.get(tenant, 0) >= self.tenant_floor:
                return
            queue = self.overflow[tenant]
            w = queue.popleft()
            if not queue:
                del self.overflow[tenant]
            self.overflow_ops -= len(w.chunk.items)
            await self._admit(w)

    async def _admit(self, w: Waiting) -> None:
        chunk, now, wall = w.chunk, w.seen, w.wall
        carrier = Carrier(w.msg, 0, w.touched)
        ops = [op for op in chunk.ops if op.key not in self.pool]  # a replay: once
        self.arrivals.setdefault(chunk.batch_key, Arrivals()).add(len(ops), now)
        # decided as they arrive: a group that waiting cannot grow is shown to the
        # policy as old enough not to linger (its linger rule is by age); linger_s
        # older moves the aging term by linger_s / aging_scale_s, a constant
        lingers = self._lingers(
            chunk.batch_key, [Held(ops[0], carrier, wall, chunk.more)] if ops else [], now
        )
        ready_at = wall if lingers else wall - self.config.linger_s
        for op in ops:
            self.pool[op.key] = Held(op, carrier, wall, chunk.more)
            self.ready.add(self._item(op, ready_at))
            self.held_by[op.tenant] += 1
            carrier.left += 1
        if carrier.left:
            self.carriers[id(carrier)] = carrier
        else:
            await w.msg.ack()

    async def _intake_loop(self) -> None:
        """Ready chunks in as soon as they arrive (a fetch returns on the first), so an
        operator on an idle fabric is scheduled at once, not at the next tick: the
        round runs here, unless one is running, not after whatever else this process
        has queued meanwhile (the planner's work, when it shares the process)."""
        while not self._stopping.is_set():
            if self.full:
                await asyncio.sleep(self.tick_s)
                continue
            if await self._fill_pool(timeout=1.0) and not self._round_lock.locked():
                self._wake.clear()
                await self._round()

    async def _round(self) -> int:
        """One assignment round (one at a time), and the overflow promoted if it freed
        room in the pool."""
        async with self._round_lock:
            assigned = await self.assign_once() if self.held else 0
            if assigned and self.overflow:
                await self._promote()  # the pool has room again
            return assigned

    async def _schedule_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            assigned = await self._round()
            await self._keep_alive()
            if metrics.due("scheduler", 0.5):
                metrics.ready_depth(Counter(h.op.spec.kind for h in self.pool.values()))
                metrics.live_workers(Counter(w.info.device_class for w in self.live_workers()))
            if not assigned:
                # woken by new ready work or a worker's heartbeat; the timeout re-scores
                # lingering groups
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.tick_s * 5)

    def _item(self, op: ReadyOp, ready_at: float) -> ReadyItem:
        """What the policy sees of a held operator (built once, when it arrives); its
        model's size as a worker announced it (self.model_gb until one has)."""
        return ReadyItem(
            key=op.key,
            batch_key=op.batch_key,
            kind=op.spec.kind,
            executor=f"{op.spec.executor}@{op.spec.version}",
            model=op.spec.model,
            model_gb=self._known_gb.get(op.spec.model, self.model_gb) if op.spec.model else 0.0,
            input_bytes=op.input_bytes,
            tenant=op.tenant,
            workflow_id=op.workflow_id,
            ready_at=ready_at,
        )

    def _take(self, key: str) -> Held:
        """A held operator out of the pool (it is being assigned)."""
        self.ready.remove(key)
        held = self.pool.pop(key)
        left = self.held_by[held.op.tenant] - 1
        if left > 0:
            self.held_by[held.op.tenant] = left
        else:
            del self.held_by[held.op.tenant]
        return held

    def _lingers(self, batch_key: str, group: Iterable[Held], now: float) -> bool:
        """Whether a partial group of this batch key may wait for company: only when
        waiting can grow it, that is when the planner said more of its node are on the
        way and the key's observed arrival rate expects at least one more within the
        linger window. Never for a lone chain of operators on an idle fabric."""
        linger = self.config.linger_s
        if linger <= 0 or not any(h.more for h in group):
            return False
        arrivals = self.arrivals.get(batch_key)
        return arrivals is not None and arrivals.rate(now) * linger >= 1.0

    async def assign_once(self) -> int:
        """One policy round over the pool and the workers with free slots."""
        workers = self.live_workers()
        if not workers:
            return 0
        if self._counts is None or time.monotonic() - self._counts_at > COUNTS_MAX_AGE_S:
            await self._read_counts()
        assert self._counts is not None
        now = time.time()
        groups = self.ready.groups()
        decisions = self.policy.decide_groups(
            groups, self._states(workers, self._counts), now=now, fair=self.fair
        )
        if not decisions and self._counts_stale:
            # the kept counts may show busy a worker that has finished since: look
            await self._read_counts()
            decisions = self.policy.decide_groups(
                groups, self._states(workers, self._counts), now=now, fair=self.fair
            )
        self._warn_unschedulable([g.items[0] for g in groups])
        by_id = {w.info.worker: w.info for w in workers}
        for d in decisions:
            batch = [self._take(it.key) for it in d.items]
            await self._send(by_id[d.worker], batch)
            start = max(now, self._busy_until.get(d.worker, now))
            self._busy_until[d.worker] = start + d.seconds
            log.info(
                "batch assigned",
                worker=d.worker,
                device_class=d.device_class,
                executor=d.items[0].executor,
                size=len(d.items),
                workflows=len({it.workflow_id for it in d.items}),
                score=round(d.score, 4),
                terms={k: round(v, 4) for k, v in d.terms.items()},
                est_s=round(d.seconds, 4),
                load=d.load_model,
            )
            wf_ids = [it.workflow_id for it in d.items]
            metrics.batch_assigned(d.items[0].kind, d.device_class, wf_ids)
        return len(decisions)

    def _states(self, workers: list[WorkerView], counts: dict[str, int]) -> list[WorkerState]:
        """What the policy sees of the live workers, their free slots from `counts`."""
        sizes = self._known_gb  # as the workers announced them (self.model_gb for the rest)
        states = []
        for w in workers:
            info = w.info
            self._ensure_class(info)
            free = max(0, info.slots - counts.get(subjects.assign(info.worker), 0))
            if free:  # nothing outstanding beyond its slots: forget stale estimates
                self._busy_until.pop(info.worker, None)
            states.append(
                WorkerState(
                    id=info.worker,
                    device_class=info.device_class,
                    free_slots=free,
                    resident={m: sizes.get(m, self.model_gb) for m in info.resident},
                    executors=frozenset(f"{k}@{v}" for k, v in info.executors.items()),
                    models=frozenset(info.models.values()),
                    batch_caps={
                        f"{k}@{info.executors[k]}": v
                        for k, v in info.max_batch.items()
                        if k in info.executors
                    },
                    busy_until=self._busy_until.get(info.worker) if not free else None,
                )
            )
        return states

    def _warn_unschedulable(self, items: list[ReadyItem]) -> None:
        """Say once per kind when ready operators wait for a kind no device class runs,
        instead of letting a workflow hang in silence."""
        for it in items:
            if it.kind not in self.fleet.kinds and it.kind not in self._warned:
                self._warned.add(it.kind)
                log.warning(
                    "ready operators of a kind no device class runs",
                    kind=it.kind,
                    classes=sorted(self.fleet.classes),
                )

    def _ensure_class(self, info: WorkerInfo) -> None:
        if info.device_class in self.fleet.classes:
            return
        kinds = {ex.split(".", 1)[0] for ex in info.executors}
        self.fleet = self.fleet.with_class(
            info.device_class, info.price_per_hour, info.watts, info.memory_gb, kinds
        )
        self.estimator = LatencyEstimator(self.fleet)
        self.policy = Policy(self.fleet, self.config, self.estimator)

    async def _send(self, worker: WorkerInfo, batch: list[Held]) -> None:
        assignment = Assignment.of(
            uuid.uuid4().hex, worker.worker, [h.op for h in batch], time.time()
        )
        subject = subjects.assign(worker.worker)
        await self.bus.publish(subject, assignment, msg_id=assignment.batch_id)
        self._sent[subject] += 1
        if self._counts is not None:
            self._counts[subject] = self._counts.get(subject, 0) + 1
        for h in batch:
            h.carrier.left -= 1
            if h.carrier.left == 0:
                self.carriers.pop(id(h.carrier), None)
                await h.carrier.msg.ack()
        self.assigned_batches += 1

    async def _keep_alive(self) -> None:
        """Chunks with operators waiting for a worker keep their message claimed."""
        now = time.monotonic()
        limit = streams.READY_ACK_WAIT_S / 3
        for carrier in self.carriers.values():
            if now - carrier.touched > limit:
                carrier.touched = now
                await carrier.msg.in_progress()
        for queue in self.overflow.values():
            for w in queue:
                if now - w.touched > limit:
                    w.touched = now
                    await w.msg.in_progress()
