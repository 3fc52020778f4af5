"""FlowMesh's five streams on Kafka, with aiokafka: the Kafka `Transport`
(topics/bus/transport.py).

Subjects are topic names as they stand (`fm.op.ready.cpu`, `fm.assign.<worker>`: dots,
letters, digits, `_` and `-` are legal in both), each topic with one partition, which
every producer names: order is kept and a consumer is *assigned* its partition instead
of joining a consumer group, so no component waits seconds for a group rebalance and a
dead worker's partition is never handed to someone else by the broker. The scheduler
reclaims it instead (`take_back`), as it reclaims unacked messages on NATS.

What is on Kafka, and what is not: submissions, ready operators, assignments,
completions and dead letters are topics here. Operator state (the dedup table and the
committed results), workflow status, worker heartbeats and advertised executors/models
stay on NATS KV by default; with $FLOWMESH_KV=kafka they are compacted changelog topics
whose partitions one owner writes (topics/bus/kafka_kv.py: the compare-and-set a commit
needs comes from that single writer), and no process connects to NATS.

How NATS semantics map:
- ack: Kafka commits a *position*, not a message. Each consumer remembers the offsets it
  handed out and not yet settled; its group's committed offset moves to the lowest one
  still open. An assignment is acked after its results are committed and its completions
  published (workers/runtime.py), so a worker killed before that leaves the offset
  uncommitted and the work is replayed: replay-after-preemption is preserved.
- nak(delay): redelivered by the same consumer after the delay; if the process dies
  first, the uncommitted offset is read again from the committed position.
- in_progress: nothing to do. There is no ack wait: a partition stays with the consumer
  assigned to it until the scheduler reclaims it (worker heartbeat lost).
- term: an ack (the caller dead-lettered the message first).
- Msg-id dedup: Kafka has no duplicate window; the id travels as a header for tracing.
  What a duplicate would do instead: a second submission is skipped by workflow id in the
  planner, a second ready or assignment runs an operator again and its commit loses the
  compare-and-set (never charged twice), a second completion finds no waiter left.
- Broadcasts (a workflow's cancel): a topic every listener reads from its end, in no
  group.
- Stream state (the monitor, the autoscaler, a restarted scheduler): end offsets minus
  the consuming group's committed offset. tansu 0.6 reports a partition's end as its
  last record batch's base offset plus one, so `true_ends` reads that batch to find the
  real end; assignments are still produced one record per request, which keeps the
  scheduler's count of a worker's load right with a plain end-offset read on brokers
  that count right and tansu alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from flowmesh.topics import streams, subjects
from flowmesh.topics.bus.transport import ConsumerStat, Handler, Record, Stop, StreamStat

log = structlog.get_logger("flowmesh.kafka")

MSG_ID_HEADER = "fm-msg-id"
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
PARTITION = 0
TOPICS_REFRESH_S = 2.0
PEEK_TIMEOUT_S = 5.0  # reading a partition's last batch or oldest records
# a committed-offset read or commit, an end-offset or topic list: the broker answers in
# milliseconds; aiokafka alone would retry some of them for ever
OFFSET_TIMEOUT_S = 10.0
# a produce not stored within this fails and is sent again (as a JetStream publish's
# own timeout); RESEND_PAUSE_S between tries
PUBLISH_TIMEOUT_S = 10.0
RESEND_PAUSE_S = 0.5
# How long the broker may hold a fetch that found nothing new. A fetch is answered when
# data arrives on Apache Kafka, but tansu 0.6 holds it for the whole wait: with
# aiokafka's 500 ms default every hop (ready -> scheduler -> assignment -> worker ->
# completion -> planner) waited ~150 ms on average for a record that was already there
# (measured: a record produced 100 ms into a fetch arrived 152 ms later at 500 ms, 5 ms
# at 20 ms). An idle consumer asks 1000/FETCH_WAIT_MS times a second, which costs a
# loaded tansu more than the latency gains in bulk (loadgen overhead on a busy 2-core box
# did not get faster at 20 ms), hence 100 (a broker that answers on arrival would
# allow aiokafka's 500).
FETCH_WAIT_MS = 100


@dataclass
class KafkaDelivery:
    """A record handed out by a `KafkaConsumer`; settles through it."""

    subject: str
    data: bytes
    offset: int
    owner: KafkaConsumer = field(repr=False)
    timestamp_ms: int = 0

    async def ack(self) -> None:
        await self.owner.settle(self)

    async def term(self) -> None:
        await self.owner.settle(self)

    async def nak(self, delay: float | None = None) -> None:
        self.owner.redeliver(self, delay or 0.0)

    async def in_progress(self) -> None:
        return None


class KafkaConsumer:
    """Partition 0 of some topics, read from the group's committed offset (or the start);
    acks commit a low watermark. `group=None`: read only, nothing committed."""

    def __init__(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition], group: str | None):
        self._consumer = consumer
        self._tps = tps
        self.group = group
        self._open: dict[TopicPartition, set[int]] = {tp: set() for tp in tps}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._again: list[tuple[float, int, KafkaDelivery]] = []  # (due, tiebreak, delivery)
        self._lock = asyncio.Lock()

    async def _position(self, ends: dict[TopicPartition, int] | None = None) -> None:
        """From the group's committed offset, else from `ends` when given (only what
        comes next), else from the start."""
        for tp in self._tps:
            committed: int | None = None
            if self.group:
                committed = await asyncio.wait_for(self._consumer.committed(tp), OFFSET_TIMEOUT_S)
            if committed is None and ends is not None:
                committed = ends[tp]
                self._consumer.seek(tp, committed)
            elif committed is None:
                await asyncio.wait_for(self._consumer.seek_to_beginning(tp), OFFSET_TIMEOUT_S)
                committed = int(
                    await asyncio.wait_for(self._consumer.position(tp), OFFSET_TIMEOUT_S)
                )
            else:
                self._consumer.seek(tp, committed)
            self._committed[tp] = self._next[tp] = committed

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[KafkaDelivery]:
        deadline = time.monotonic() + (timeout if timeout is not None else 5.0)
        while True:
            now = time.monotonic()
            due: list[KafkaDelivery] = []
            while self._again and self._again[0][0] <= now and len(due) < batch:
                due.append(heapq.heappop(self._again)[2])
            if due:
                return due
            wait = deadline - now
            if self._again:  # do not sleep past a redelivery
                wait = min(wait, self._again[0][0] - now)
            records = await self._consumer.getmany(
                *self._tps, timeout_ms=max(0, int(wait * 1000)), max_records=batch
            )
            out: list[KafkaDelivery] = []
            for tp, recs in records.items():
                for rec in recs:
                    self._open[tp].add(rec.offset)
                    self._next[tp] = rec.offset + 1
                    out.append(
                        KafkaDelivery(tp.topic, rec.value or b"", rec.offset, self, rec.timestamp)
                    )
            if out:
                return out
            if time.monotonic() >= deadline and not (
                self._again and self._again[0][0] <= time.monotonic()
            ):
                raise TimeoutError  # what a JetStream fetch raises when nothing came

    async def settle(self, d: KafkaDelivery) -> None:
        tp = TopicPartition(d.subject, PARTITION)
        self._open[tp].discard(d.offset)
        if self.group is None:
            return
        async with self._lock:
            mark = min(self._open[tp]) if self._open[tp] else self._next[tp]
            if mark > self._committed[tp]:
                await asyncio.wait_for(self._consumer.commit({tp: mark}), OFFSET_TIMEOUT_S)
                self._committed[tp] = mark

    def redeliver(self, d: KafkaDelivery, delay: float) -> None:
        heapq.heappush(self._again, (time.monotonic() + delay, d.offset, d))

    async def unsubscribe(self) -> None:
        await self._consumer.stop()


class KafkaReplay:
    """A topic read on from an offset in no group (aiokafka reconnects by itself, so it
    never goes stale). A record's sequence is its offset plus one, as on NATS."""

    stale = False

    def __init__(self, consumer: KafkaConsumer, since: float | None = None) -> None:
        self._consumer = consumer
        self._since = since

    async def fetch(self, batch: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            got = await self._consumer.fetch(batch, max(0.0, deadline - time.monotonic()))
            out = [Record(d.offset + 1, d.subject, d.data, d.timestamp_ms / 1000) for d in got]
            if self._since is not None:
                # tansu 0.6 answers a time past the last record with offset 0, not -1
                out = [r for r in out if r.at >= self._since]
            if out:
                return out
            if time.monotonic() >= deadline:
                raise TimeoutError

    async def unsubscribe(self) -> None:
        await self._consumer.unsubscribe()


class KafkaStreams:
    """The `Transport` on Kafka: the producer, topic set-up, consumers and offset reads
    every component on Kafka shares."""

    name = "kafka"

    def __init__(self, bootstrap: str, name: str) -> None:
        self.bootstrap = bootstrap
        self.client_id = name
        # a produce the broker does not take within PUBLISH_TIMEOUT_S fails (aiokafka's
        # default waits 40 s), so publish_many can send it again within its retry_s
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=name,
            acks="all",
            linger_ms=1,
            request_timeout_ms=int(PUBLISH_TIMEOUT_S * 1000),
        )
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=name)
        # reads end offsets and topic lists; belongs to no group
        self._meta = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id=name)
        self._groups: dict[str, AIOKafkaConsumer] = {}  # group -> offset reader
        self._groups_lock = asyncio.Lock()
        self._reading: dict[str, int] = {}  # group -> reads in flight through its reader
        self._retiring: set[str] = set()  # groups whose reader stops once idle
        self._settled: dict[str, int] = {}  # assignment topic -> end offset, all acked
        self._topics: set[str] = set()  # made (or found) by this process
        self._listed: set[str] = set()  # the broker's topics, read at _listed_at
        self._listed_at = -math.inf
        self._produced_end: dict[str, int] = {}  # topic -> end of what this process produced
        self._consumers: list[KafkaConsumer] = []
        # reads a partition's last batch (true_ends) and the ready backlog; no group
        self._peek: AIOKafkaConsumer | None = None
        self._peek_lock = asyncio.Lock()
        self._listeners: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(cls, bootstrap: str, name: str, timeout_s: float = 30.0) -> KafkaStreams:
        self = cls(bootstrap, name)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self._producer.start()
                await self._admin.start()
                await self._meta.start()
                break
            except Exception as exc:  # the broker is still starting
                if time.monotonic() > deadline:
                    await self.close()
                    raise RuntimeError(f"no Kafka broker reachable at {bootstrap}: {exc}") from exc
                await asyncio.sleep(0.5)
        log.debug("kafka connected", bootstrap=bootstrap, client=name)
        return self

    # --- topics and publishing ----------------------------------------------------------

    @property
    def producer(self) -> AIOKafkaProducer:
        return self._producer

    async def ensure_topic(
        self, topic: str, partitions: int = 1, config: dict[str, str] | None = None
    ) -> None:
        """Create the topic with one partition (or `partitions`) unless it exists
        (brokers that auto-create would make several, and every record must land on the
        partition consumers read); `config`: its topic configs (cleanup.policy)."""
        if topic in self._topics:
            return
        new = NewTopic(topic, partitions, 1, topic_configs=config or {})
        resp = await asyncio.wait_for(self._admin.create_topics([new]), OFFSET_TIMEOUT_S)
        for err in resp.topic_errors:
            code = err[1]
            if code not in (0, TOPIC_EXISTS):
                raise RuntimeError(f"cannot create Kafka topic {topic}: error {code} {err[2:]}")
        self._topics.add(topic)

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        await self.ensure_topic(subject)
        md = await self._producer.send_and_wait(
            subject, data, partition=PARTITION, headers=_headers(msg_id)
        )
        self._produced(subject, md.offset)

    async def publish_many(
        self, items: list[tuple[str, bytes, str | None]], retry_s: float = 0.0
    ) -> None:
        """Send all, then wait until the broker stored each (the producer batches them).
        A retriable broker error (tansu answered NotLeaderForPartition to every produce of
        a worker's results for 40 s in some test runs, then took them again) sends them
        all again, for up to `retry_s`: the caller would otherwise drop results it
        computed and run its batch again. Records stored before the error are then stored
        twice, with their msg ids: the same duplicate a redelivered batch makes."""
        for subject in {s for s, _, _ in items}:
            await self.ensure_topic(subject)
        deadline = time.monotonic() + retry_s
        while True:
            futures = [
                await self._producer.send(subject, data, partition=PARTITION, headers=_headers(mid))
                for subject, data, mid in items
            ]
            try:
                stored = await asyncio.gather(*futures)
                break
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() >= deadline:
                    raise
                log.warning("kafka publish failed; sending again", error=repr(exc))
                await asyncio.sleep(RESEND_PAUSE_S)
        for (subject, _, _), md in zip(items, stored, strict=True):
            self._produced(subject, md.offset)

    def _produced(self, topic: str, offset: int) -> None:
        if offset + 1 > self._produced_end.get(topic, 0):
            self._produced_end[topic] = offset + 1

    # --- consuming ----------------------------------------------------------------------

    async def consumer(
        self, topics: list[str], group: str | None, start: Literal["first", "end"] = "first"
    ) -> KafkaConsumer:
        """Deliveries from partition 0 of `topics`, from `group`'s committed offsets;
        where it has none (or with group None), from the first record, or with
        start="end" only the records produced from now on."""
        for topic in topics:
            await self.ensure_topic(topic)
        raw = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        await raw.start()
        tps = [TopicPartition(t, PARTITION) for t in topics]
        raw.assign(tps)
        consumer = KafkaConsumer(raw, tps, group)
        await consumer._position(await self.true_ends(tps) if start == "end" else None)
        self._consumers.append(consumer)
        return consumer

    async def replay(self, subject: str, after: int = 0, since: float | None = None) -> KafkaReplay:
        consumer = await self.consumer([subject], None)
        tp = TopicPartition(subject, PARTITION)
        if since is not None:
            found = await asyncio.wait_for(
                consumer._consumer.offsets_for_times({tp: int(since * 1000)}), OFFSET_TIMEOUT_S
            )
            at = found.get(tp)
            # none stored since then: from the end (nothing to read)
            after = at.offset if at is not None else (await self.true_ends([tp]))[tp]
        if after:
            consumer._consumer.seek(tp, after)  # the offset of sequence after + 1
            consumer._next[tp] = after
        return KafkaReplay(consumer, since)

    async def ready_consumer(self) -> KafkaConsumer:
        """Every pool's topic, committed in group `scheduler`."""
        return await self.consumer(self.ready_topics(), streams.SCHEDULER)

    async def assignment_consumer(self, worker: str, slots: int) -> KafkaConsumer:
        """The worker's own topic, committed in its own group only after results are
        committed and completions published: a kill before that replays the batch."""
        return await self.consumer([subjects.assign(worker)], streams.worker_consumer_name(worker))

    async def assignment_consumer_gone(self, worker: str) -> bool:
        return False  # a reclaim does not delete the topic: the worker reads on

    async def done_consumer(self, name: str) -> KafkaConsumer:
        """Every completion, from the committed offset of the shard's group."""
        return await self.consumer([subjects.DONE], name)

    async def broadcast(self, subject: str, data: bytes) -> None:
        await self.publish(subject, data)

    async def listen(self, subject: str, handler: Callable[[bytes], Awaitable[None]]) -> Stop:
        """A topic read from its end in no group: every listener sees each notice."""
        consumer = await self.consumer([subject], None, start="end")

        async def loop() -> None:
            while True:
                try:
                    got = await consumer.fetch(64, timeout=1.0)
                except TimeoutError:
                    continue
                except Exception as exc:  # the broker is away: aiokafka reconnects
                    log.warning("listening failed", subject=subject, error=repr(exc))
                    await asyncio.sleep(0.5)
                    continue
                for d in got:
                    await handler(d.data)
                    await d.ack()

        task = asyncio.create_task(loop())
        self._listeners.append(task)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if consumer in self._consumers:
                self._consumers.remove(consumer)
            with contextlib.suppress(Exception):
                await consumer.unsubscribe()

        return stop

    async def _committed(self, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """`group`'s committed offset per partition (0 where it has none), read by a
        reader of the group kept between calls. aiokafka's committed() retries until
        the group's coordinator answers, and never returns from a reader stopped under
        it (a reader retired by one task while another read through it hung the
        scheduler's liveness loop, so dead workers were never reclaimed): readers are
        stopped only when no read is in flight, and every read is bounded."""
        async with self._groups_lock:
            reader = self._groups.get(group)
            if reader is None:
                reader = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    client_id=self.client_id,
                    group_id=group,
                    enable_auto_commit=False,
                )
                await asyncio.wait_for(reader.start(), OFFSET_TIMEOUT_S)
                self._groups[group] = reader
            self._reading[group] = self._reading.get(group, 0) + 1
        try:
            out = {}
            for tp in tps:
                out[tp] = await asyncio.wait_for(reader.committed(tp), OFFSET_TIMEOUT_S) or 0
            return out
        except TimeoutError:
            self._retiring.add(group)  # a fresh reader next time
            raise
        finally:
            self._reading[group] -= 1
            await self._stop_retired(group)

    async def _retire_reader(self, group: str) -> None:
        """No more reads of `group` expected for a while: stop its reader once idle."""
        self._retiring.add(group)
        await self._stop_retired(group)

    async def _stop_retired(self, group: str) -> None:
        if group not in self._retiring or self._reading.get(group, 0) > 0:
            return
        self._retiring.discard(group)
        self._reading.pop(group, None)
        reader = self._groups.pop(group, None)
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.stop()

    async def _peeker(self) -> AIOKafkaConsumer:
        if self._peek is None:
            peek = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, client_id=self.client_id, enable_auto_commit=False
            )
            await asyncio.wait_for(peek.start(), OFFSET_TIMEOUT_S)
            self._peek = peek
        return self._peek

    async def true_ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's end offset (the offset its next record will get). tansu
        0.6 reports the base offset of a partition's last record batch plus one, too low
        when that batch holds several records (the producer batches whatever it sends
        within linger_ms), so the last batch is read to find its last offset."""
        if not tps:
            return {}
        reported = await asyncio.wait_for(self._meta.end_offsets(tps), OFFSET_TIMEOUT_S)
        ends = dict(reported)
        # What this process produced itself it knows exactly; a record another process
        # produced after it would report an end past it. So where the reported end is
        # not past ours, ours is the end, and the broker's last batch need not be read
        # (the scheduler, which produces every assignment, asks this every round).
        known = set()
        for tp in tps:
            mine = self._produced_end.get(tp.topic, 0)
            if 0 < reported[tp] <= mine:
                ends[tp] = mine
                known.add(tp)
        tail = [tp for tp in tps if reported[tp] > 0 and tp not in known]
        if not tail:
            return ends
        peek = await self._peeker()
        async with self._peek_lock:
            peek.assign(tail)
            for tp in tail:
                peek.seek(tp, reported[tp] - 1)
            todo = set(tail)
            deadline = time.monotonic() + PEEK_TIMEOUT_S
            while todo and time.monotonic() < deadline:
                got = await peek.getmany(*todo, timeout_ms=200)
                for tp, recs in got.items():
                    if recs:
                        ends[tp] = max(ends[tp], recs[-1].offset + 1)
                        todo.discard(tp)
        return ends

    async def _topics_with(self, prefix: str) -> list[str]:
        """The topics of one role: the broker's list, read at most every
        TOPICS_REFRESH_S (a metadata request per scheduling round costs more than the
        round), plus those this process made since."""
        if time.monotonic() - self._listed_at > TOPICS_REFRESH_S:
            self._listed = set(await asyncio.wait_for(self._meta.topics(), OFFSET_TIMEOUT_S))
            self._listed_at = time.monotonic()
        return sorted(
            t for t in self._listed | self._topics if t == prefix or t.startswith(prefix + ".")
        )

    async def assigned_counts(self) -> dict[str, int]:
        """Assignment subject -> batches its worker has not acked yet (the topic's end
        offset minus the worker group's committed offset): what JetStream's per-subject
        message count says on NATS, so a restarted scheduler knows every worker's load."""
        topics = await self._topics_with(subjects.ASSIGN_PREFIX)
        if not topics:
            return {}
        tps = [TopicPartition(t, PARTITION) for t in topics]
        ends = await self.true_ends(tps)

        async def outstanding(tp: TopicPartition) -> tuple[str, int]:
            worker = subjects.worker_of_assign_subject(tp.topic)
            if not subjects.is_token(worker) or self._settled.get(tp.topic) == ends[tp]:
                return tp.topic, 0  # nothing new since every batch on it was acked
            group = streams.worker_consumer_name(worker)
            done = (await self._committed(group, [tp]))[tp]
            if done >= ends[tp]:
                # an idle (or long dead) worker: remember, and hold no reader for it
                self._settled[tp.topic] = ends[tp]
                await self._retire_reader(group)
            return tp.topic, max(0, ends[tp] - done)

        return dict(await asyncio.gather(*(outstanding(tp) for tp in tps)))

    async def ready_backlog(self, sample: int) -> dict[str, tuple[int, list[bytes]]]:
        """Per ready topic: records past the scheduler group's committed offset, and the
        first `sample` of them (read without joining the group)."""
        tps = [TopicPartition(t, PARTITION) for t in await self._topics_with(subjects.READY_PREFIX)]
        ends = await self.true_ends(tps)
        done = await self._committed(streams.SCHEDULER, tps)
        out: dict[str, tuple[int, list[bytes]]] = {}
        waiting = {tp: ends[tp] - done[tp] for tp in tps if ends[tp] > done[tp]}
        if not waiting or sample <= 0:
            return {tp.topic: (n, []) for tp, n in waiting.items()}
        peek = await self._peeker()
        async with self._peek_lock:
            peek.assign(list(waiting))
            heads: dict[TopicPartition, list[bytes]] = {tp: [] for tp in waiting}
            for tp in waiting:
                peek.seek(tp, done[tp])
            deadline = time.monotonic() + PEEK_TIMEOUT_S
            todo = set(waiting)
            while todo and time.monotonic() < deadline:
                got = await peek.getmany(*todo, timeout_ms=200)
                for tp, recs in got.items():
                    want = min(sample, waiting[tp]) - len(heads[tp])
                    heads[tp] += [r.value or b"" for r in recs[:want]]
                    if len(heads[tp]) >= min(sample, waiting[tp]):
                        todo.discard(tp)
        for tp, n in waiting.items():
            out[tp.topic] = (n, heads[tp])
        return out

    async def stats(self) -> tuple[list[StreamStat], list[ConsumerStat]]:
        """The topics of each role as the stream of that role on NATS. FM_READY and
        FM_ASSIGN count what their consumer group has not committed (a work queue's
        messages), the others what is kept; a consumer's `pending` is its group's lag
        (Kafka cannot tell delivered-unacked from not delivered: ack_pending stays 0)."""
        roles = [
            (streams.STREAM_SUBMIT, subjects.SUBMIT),
            (streams.STREAM_READY, subjects.READY_PREFIX),
            (streams.STREAM_ASSIGN, subjects.ASSIGN_PREFIX),
            (streams.STREAM_DONE, subjects.DONE),
            (streams.STREAM_DLQ, subjects.DLQ_PREFIX),
        ]
        all_topics = await asyncio.wait_for(self._meta.topics(), OFFSET_TIMEOUT_S)
        by_role = {
            name: sorted(t for t in all_topics if t == prefix or t.startswith(prefix + "."))
            for name, prefix in roles
        }
        tps = [TopicPartition(t, PARTITION) for ts in by_role.values() for t in ts]
        ends = await self.true_ends(tps)
        starts = {}
        if tps:
            starts = await asyncio.wait_for(self._meta.beginning_offsets(tps), OFFSET_TIMEOUT_S)
        listed = await asyncio.wait_for(self._admin.list_consumer_groups(), OFFSET_TIMEOUT_S)
        groups = [g for g, *_ in listed]
        done_groups = sorted(g for g in groups if g.startswith(streams.PLANNER_DONE))
        rows: list[StreamStat] = []
        consumers: list[ConsumerStat] = []
        for name, topics in by_role.items():
            role_tps = [TopicPartition(t, PARTITION) for t in topics]
            kept = {tp.topic: ends[tp] - starts[tp] for tp in role_tps}
            counts: dict[str, int] = {}
            n_consumers = 0
            if name == streams.STREAM_READY:
                done = await self._committed(streams.SCHEDULER, role_tps)
                counts = {tp.topic: ends[tp] - done[tp] for tp in role_tps}
                n_consumers = 1 if streams.SCHEDULER in groups else 0
                if n_consumers:
                    consumers.append(
                        ConsumerStat(name, streams.SCHEDULER, sum(counts.values()), 0, 0)
                    )
            elif name == streams.STREAM_ASSIGN:
                counts = await self.assigned_counts()
                for topic in topics:
                    worker = subjects.worker_of_assign_subject(topic)
                    group = (
                        streams.worker_consumer_name(worker) if subjects.is_token(worker) else ""
                    )
                    if group in groups:
                        n_consumers += 1
                        consumers.append(ConsumerStat(name, group, counts.get(topic, 0), 0, 0))
            elif name == streams.STREAM_DONE:
                for group in done_groups:
                    lag = sum(
                        ends[tp] - c for tp, c in (await self._committed(group, role_tps)).items()
                    )
                    consumers.append(ConsumerStat(name, group, lag, 0, 0))
                n_consumers = len(done_groups)
            messages = sum(counts.values()) if counts else sum(kept.values())
            rows.append(
                StreamStat(
                    name=name,
                    messages=messages,
                    bytes=0,  # Kafka does not report a topic's size to clients
                    consumers=n_consumers,
                    subjects={k: v for k, v in counts.items() if v},
                )
            )
        return rows, consumers

    async def take_back(self, worker: str, handle: Handler) -> int:
        """Every assignment `worker` has not acked, to `handle(subject, data)` in order;
        then the worker's group is committed past them. Returns how many.

        A crash in between hands them out again on the next reclaim: duplicates, which
        the compare-and-set commit makes harmless. A worker that was only paused and
        comes back reads on from where it was and may run some of them a second time,
        with the same harmless outcome."""
        topic = subjects.assign(worker)
        await self.ensure_topic(topic)
        consumer = await self.consumer([topic], streams.worker_consumer_name(worker))
        tp = TopicPartition(topic, PARTITION)
        try:
            n = 0
            # read until nothing comes, not up to the end offset: tansu reports the end of
            # a topic written in multi-record batches too low
            while True:
                try:
                    got = await consumer.fetch(64, timeout=0.5)
                except TimeoutError:
                    break
                for d in got:
                    await handle(d.subject, d.data)
                    n += 1
            if consumer._next[tp] > consumer._committed[tp]:
                await asyncio.wait_for(
                    consumer._consumer.commit({tp: consumer._next[tp]}), OFFSET_TIMEOUT_S
                )
        finally:
            self._consumers.remove(consumer)
            await consumer.unsubscribe()
            await self._retire_reader(streams.worker_consumer_name(worker))
        return n

    def ready_topics(self) -> list[str]:
        """The ready topic of every pool an operator kind names."""
        from flowmesh.topics.operators import KINDS

        return sorted({subjects.ready(kind.pool) for kind in KINDS.values()})

    async def close(self) -> None:
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        self._listeners.clear()
        clients: list[Any] = [
            *(c._consumer for c in self._consumers),
            *self._groups.values(),
            *([self._peek] if self._peek is not None else []),
            self._meta,
            self._producer,
        ]
        for client in clients:
            with contextlib.suppress(Exception):
                await client.stop()
        with contextlib.suppress(Exception):
            await self._admin.close()
        self._consumers.clear()
        self._groups.clear()


def _headers(msg_id: str | None) -> list[tuple[str, bytes]] | None:
    return [(MSG_ID_HEADER, msg_id.encode())] if msg_id else None
