"""The live scheduler: ready operators in, batch assignments out.

It holds a pool of ready operators (fetched from `fm.op.ready.>`, acked only once their
assignment is stored), groups compatible ones (same batch key) across workflows, and asks
the pure policy (`engine/scheduler/policy.py`, scoring with the utility function of
`engine/scheduler/utility.py`) which batch goes to which live worker with a free slot;
the simulator runs the same policy.

Capacity is read from the stream itself: the number of messages on `fm.assign.<worker>`
is exactly the number of batches a worker holds (work-queue retention drops a message
when the worker acks it), so a restarted scheduler knows every worker's load at once.

A worker whose heartbeat stops (SIGKILL, lost host) is reclaimed: its consumer is
deleted, its unacked assignments are read back and their operators republished as ready.
Replay is safe because workers commit results by compare-and-set on the operator key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from nats.js.errors import APIError, NotFoundError

from flowmesh.engine import metrics
from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import Fleet, LatencyEstimator
from flowmesh.engine.scheduler.groups import ReadyPool
from flowmesh.engine.scheduler.policy import Policy, PolicyConfig, ReadyItem, WorkerState
from flowmesh.engine.supervise import guarded
from flowmesh.topics import Bus, streams, subjects
from flowmesh.topics.messages import Assignment, ReadyChunk, ReadyOp, WorkerInfo, chunks_of
from flowmesh.topics.operators import pool_of
from flowmesh.topics.transport import Consumer

log = structlog.get_logger("flowmesh.scheduler")

NO_MESSAGE_FOUND = 10057  # JetStream's answer to deleting a message already gone
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
class Held:
    op: ReadyOp
    carrier: Carrier
    ready_at: float  # wall clock, for aging
    more: bool = False  # the planner said more operators of its node are on the way


# How fast the arrival-rate estimate of a batch key forgets (seconds).
RATE_TAU_S = 2.0


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


class Scheduler:
    def __init__(
        self,
        bus: Bus,
        *,
        dead_after_s: float = 5.0,
        pool_limit: int = 20_000,
        tick_s: float = 0.02,
        fleet: Fleet | None = None,
        config: PolicyConfig | None = None,
        model_gb: float = 1.0,
    ) -> None:
        self.bus = bus
        self.dead_after_s = dead_after_s
        self.pool_limit = pool_limit
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

    @property
    def held(self) -> int:
        return len(self.pool)

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
        if self.bus.kafka is not None:  # every pool's topic, committed in group `scheduler`
            return await self.bus.kafka.consumer(self.bus.kafka.ready_topics(), streams.SCHEDULER)
        return await self.bus.js.pull_subscribe(  # type: ignore[no-any-return]
            subjects.READY_ALL,
            durable=streams.SCHEDULER,
            stream=streams.STREAM_READY,
            config=streams.scheduler_consumer(),
        )

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
                self._wake.set()
        finally:
            await watcher.stop()

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
            if not self.bus.nc.is_connected or self.bus.reconnects != seen:
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
                for subject, count in (await self._assigned_counts()).items():
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
        if self.bus.kafka is not None:
            n_ops = await self._take_back_kafka(wid, running)
        else:
            n_ops = await self._take_back_nats(wid, running)
        with contextlib.suppress(Exception):  # its heartbeat entry; TTL removes it anyway
            await self.kv_workers.delete(wid)
        self.reclaimed_ops += n_ops
        metrics.ops_reclaimed(n_ops)
        log.warning("worker reclaimed", worker=wid, reason=reason, ops=n_ops)

    async def _take_back_nats(self, wid: str, running: str | None) -> int:
        """The worker's unacked assignments, re-published as ready; how many operators.

        Read by subject straight from the stream (message get, then delete), not
        through a consumer of our own: on a work-queue stream a second consumer filtered
        on fm.assign.<wid> is refused while the worker's exists (err 10100 'filtered
        consumer not unique'), and the worker may have re-created its own in between
        (a false death: it rejoins) or be re-creating it now; ours would also block
        its re-creation. With no consumer of ours neither side can block the other."""
        js = self.bus.js
        name = streams.worker_consumer_name(wid)
        with contextlib.suppress(NotFoundError):
            await self.bus.retrying(
                "delete worker consumer",
                lambda: js.delete_consumer(streams.STREAM_ASSIGN, name),
                retry_s=10.0,
            )
        n_ops = 0
        seq = 1
        while True:
            try:
                raw = await self.bus.retrying(
                    "read back assignment",
                    functools.partial(
                        js.get_msg,
                        streams.STREAM_ASSIGN,
                        seq=seq,
                        subject=subjects.assign(wid),
                        next=True,
                    ),
                    retry_s=10.0,
                )
            except NotFoundError:
                break  # none left at or after seq
            at = raw.seq or seq
            seq = at + 1
            batch = await self.bus.decode_or_dead_letter(
                "scheduler", raw.subject or subjects.assign(wid), raw.data or b"", Assignment
            )
            if batch is not None:
                n_ops += await self._republish(batch, running)
            # republished first, deleted after: a crash in between replays it again
            # (safe: commits are compare-and-set), never loses it; gone already (err
            # 10057 'no message found') means a rejoined worker acked it meanwhile
            try:
                await self.bus.retrying(
                    "delete taken-back assignment",
                    functools.partial(js.delete_msg, streams.STREAM_ASSIGN, at),
                    retry_s=10.0,
                )
            except APIError as exc:
                if not isinstance(exc, NotFoundError) and exc.err_code != NO_MESSAGE_FOUND:
                    raise
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

    async def _take_back_kafka(self, wid: str, running: str | None) -> int:
        """The same on Kafka: the worker's uncommitted assignments (topics/kafka_bus.py)."""
        assert self.bus.kafka is not None
        n_ops = 0

        async def republish(subject: str, data: bytes) -> None:
            nonlocal n_ops
            batch = await self.bus.decode_or_dead_letter("scheduler", subject, data, Assignment)
            if batch is not None:
                n_ops += await self._republish(batch, running)

        await self.bus.kafka.take_back(wid, republish)
        return n_ops

    # --- scheduling -----------------------------------------------------------------

    async def _assigned_counts(self) -> dict[str, int]:
        if self.bus.kafka is not None:
            return await self.bus.kafka.assigned_counts()
        info = await self.bus.js.stream_info(
            streams.STREAM_ASSIGN, subjects_filter=subjects.ASSIGN_ALL
        )
        return dict(info.state.subjects or {})

    async def _fill_pool(self, timeout: float = 0.05) -> int:
        if self.held >= self.pool_limit:
            return 0
        try:
            msgs = await self.psub.fetch(FETCH_CHUNKS, timeout=timeout)
        except TimeoutError:
            return 0
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
            carrier = Carrier(msg, 0, now)
            ops = [op for op in chunk.ops if op.key not in self.pool]  # a replay: once
            self.arrivals.setdefault(chunk.batch_key, Arrivals()).add(len(ops), now)
            # decided as they arrive: a group that waiting cannot grow is shown to the
            # policy as old enough not to linger (its linger rule is by age); linger_s
            # older moves the aging term by linger_s / aging_scale_s, a constant
            lingers = self._lingers(
                chunk.batch_key, [Held(ops[0], carrier, wall, chunk.more)] if ops else [], now
            )
            ready_at = wall if lingers else wall - self.config.linger_s
            sizes = self._model_sizes()
            for op in ops:
                self.pool[op.key] = Held(op, carrier, wall, chunk.more)
                self.ready.add(self._item(op, ready_at, sizes))
                carrier.left += 1
            if carrier.left:
                self.carriers[id(carrier)] = carrier
            else:
                await msg.ack()
        if msgs:
            self._wake.set()
        return len(msgs)

    async def _intake_loop(self) -> None:
        """Ready chunks in as soon as they arrive (a fetch returns on the first), so an
        operator on an idle fabric is scheduled at once, not at the next tick."""
        while not self._stopping.is_set():
            if self.held >= self.pool_limit:
                await asyncio.sleep(self.tick_s)
                continue
            await self._fill_pool(timeout=1.0)

    async def _schedule_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            assigned = await self.assign_once() if self.held else 0
            await self._keep_alive()
            if metrics.due("scheduler", 0.5):
                metrics.ready_depth(Counter(h.op.spec.kind for h in self.pool.values()))
                metrics.live_workers(Counter(w.info.device_class for w in self.live_workers()))
            if not assigned:
                # woken by new ready work or a worker's heartbeat; the timeout re-scores
                # lingering groups
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.tick_s * 5)

    def _model_sizes(self) -> dict[str, float]:
        """Model sizes as the workers announce them (self.model_gb for the rest)."""
        return {d: gb for w in self.workers.values() for d, gb in w.info.model_gb.items()}

    def _item(self, op: ReadyOp, ready_at: float, sizes: dict[str, float]) -> ReadyItem:
        """What the policy sees of a held operator (built once, when it arrives)."""
        return ReadyItem(
            key=op.key,
            batch_key=op.batch_key,
            kind=op.spec.kind,
            executor=f"{op.spec.executor}@{op.spec.version}",
            model=op.spec.model,
            model_gb=sizes.get(op.spec.model, self.model_gb) if op.spec.model else 0.0,
            input_bytes=0,
            tenant=op.tenant,
            workflow_id=op.workflow_id,
            ready_at=ready_at,
        )

    def _take(self, key: str) -> Held:
        """A held operator out of the pool (it is being assigned)."""
        self.ready.remove(key)
        return self.pool.pop(key)

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
        counts = await self._assigned_counts()
        now = time.time()
        # model sizes as the workers announce them (self.model_gb for the rest)
        sizes = {d: gb for w in workers for d, gb in w.info.model_gb.items()}
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
        groups = self.ready.groups()
        decisions = self.policy.decide_groups(groups, states, now=now, fair=self.fair)
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
        await self.bus.publish(
            subjects.assign(worker.worker), assignment, msg_id=assignment.batch_id
        )
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
