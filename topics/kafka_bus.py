"""FlowMesh's five streams on Kafka, with aiokafka (issue 9).

Subjects are topic names as they stand (`fm.op.ready.cpu`, `fm.assign.<worker>`: dots,
letters, digits, `_` and `-` are legal in both), each topic with one partition, which
every producer names: order is kept and a consumer is *assigned* its partition instead
of joining a consumer group, so no component waits seconds for a group rebalance and a
dead worker's partition is never handed to someone else by the broker. The scheduler
reclaims it instead (`take_back`), as it reclaims unacked messages on NATS.

What is on Kafka, and what is not: submissions, ready operators, assignments,
completions and dead letters are topics here. Operator state (the dedup table and the
committed results), workflow status, worker heartbeats, advertised executors/models and
the CAS stay on NATS KV / object store. The commit of a result is a compare-and-set on
the operator's KV revision; a compacted Kafka topic has the latest value per key but no
compare-and-set, so it would need one single writer per key to serialise commits, and
read-your-write lookups (dedup at submit time) would need a local materialised table per
reader. Keeping KV where it is leaves every dedup and commit invariant exactly as proven.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from flowmesh.topics import streams, subjects

log = structlog.get_logger("flowmesh.kafka")

MSG_ID_HEADER = "fm-msg-id"
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
PARTITION = 0


@dataclass
class KafkaDelivery:
    """A record handed out by a `KafkaConsumer`; settles through it."""

    subject: str
    data: bytes
    offset: int
    owner: KafkaConsumer = field(repr=False)

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

    async def _position(self) -> None:
        for tp in self._tps:
            committed = await self._consumer.committed(tp) if self.group else None
            if committed is None:
                await self._consumer.seek_to_beginning(tp)
                committed = await self._consumer.position(tp)
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
                    out.append(KafkaDelivery(tp.topic, rec.value or b"", rec.offset, self))
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
                await self._consumer.commit({tp: mark})
                self._committed[tp] = mark

    def redeliver(self, d: KafkaDelivery, delay: float) -> None:
        heapq.heappush(self._again, (time.monotonic() + delay, d.offset, d))

    async def unsubscribe(self) -> None:
        await self._consumer.stop()


Handler = Callable[[str, bytes], Awaitable[None]]


class KafkaStreams:
    """The producer, topic set-up and offset reads every component on Kafka shares."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.bootstrap = bootstrap
        self.name = name
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id=name, acks="all", linger_ms=1
        )
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=name)
        # reads end offsets and topic lists; belongs to no group
        self._meta = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id=name)
        self._groups: dict[str, AIOKafkaConsumer] = {}  # group -> offset reader
        self._settled: dict[str, int] = {}  # assignment topic -> end offset, all acked
        self._topics: set[str] = set()
        self._consumers: list[KafkaConsumer] = []

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

    async def ensure_topic(self, topic: str) -> None:
        """Create the topic with one partition unless it exists (brokers that auto-create
        would make several, and every record must land on the partition consumers read)."""
        if topic in self._topics:
            return
        resp = await self._admin.create_topics([NewTopic(topic, 1, 1)])
        for err in resp.topic_errors:
            code = err[1]
            if code not in (0, TOPIC_EXISTS):
                raise RuntimeError(f"cannot create Kafka topic {topic}: error {code} {err[2:]}")
        self._topics.add(topic)

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        await self.ensure_topic(subject)
        await self._producer.send_and_wait(
            subject, data, partition=PARTITION, headers=_headers(msg_id)
        )

    async def publish_many(self, items: list[tuple[str, bytes, str | None]]) -> None:
        """Send all, then wait until the broker stored each (the producer batches them)."""
        for subject in {s for s, _, _ in items}:
            await self.ensure_topic(subject)
        futures = [
            await self._producer.send(subject, data, partition=PARTITION, headers=_headers(mid))
            for subject, data, mid in items
        ]
        if futures:
            await asyncio.gather(*futures)

    # --- consuming ----------------------------------------------------------------------

    async def consumer(self, topics: list[str], group: str | None) -> KafkaConsumer:
        """Deliveries from partition 0 of `topics`, from `group`'s committed offsets (the
        start when it has none); with group None, every record from the start."""
        for topic in topics:
            await self.ensure_topic(topic)
        raw = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.name,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await raw.start()
        tps = [TopicPartition(t, PARTITION) for t in topics]
        raw.assign(tps)
        consumer = KafkaConsumer(raw, tps, group)
        await consumer._position()
        self._consumers.append(consumer)
        return consumer

    async def _group_reader(self, group: str) -> AIOKafkaConsumer:
        reader = self._groups.get(group)
        if reader is None:
            reader = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=self.name,
                group_id=group,
                enable_auto_commit=False,
            )
            await reader.start()
            self._groups[group] = reader
        return reader

    async def assigned_counts(self) -> dict[str, int]:
        """Assignment subject -> batches its worker has not acked yet (the topic's end
        offset minus the worker group's committed offset): what JetStream's per-subject
        message count says on NATS, so a restarted scheduler knows every worker's load.
        (Assignments are produced one record per request, which tansu's end offsets
        count right; it counts a multi-record batch as one.)"""
        prefix = subjects.ASSIGN_PREFIX + "."
        topics = sorted(t for t in await self._meta.topics() if t.startswith(prefix))
        if not topics:
            return {}
        tps = [TopicPartition(t, PARTITION) for t in topics]
        ends = await self._meta.end_offsets(tps)

        async def outstanding(tp: TopicPartition) -> tuple[str, int]:
            worker = subjects.worker_of_assign_subject(tp.topic)
            if not subjects.is_token(worker) or self._settled.get(tp.topic) == ends[tp]:
                return tp.topic, 0  # nothing new since every batch on it was acked
            group = streams.worker_consumer_name(worker)
            done = await (await self._group_reader(group)).committed(tp) or 0
            if done >= ends[tp]:
                # an idle (or long dead) worker: remember, and hold no reader for it
                self._settled[tp.topic] = ends[tp]
                reader = self._groups.pop(group, None)
                if reader is not None:
                    await reader.stop()
            return tp.topic, max(0, ends[tp] - done)

        return dict(await asyncio.gather(*(outstanding(tp) for tp in tps)))

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
                await consumer._consumer.commit({tp: consumer._next[tp]})
        finally:
            self._consumers.remove(consumer)
            await consumer.unsubscribe()
            reader = self._groups.pop(streams.worker_consumer_name(worker), None)
            if reader is not None:
                with contextlib.suppress(Exception):
                    await reader.stop()
        return n

    def ready_topics(self) -> list[str]:
        """The ready topic of every pool an operator kind names."""
        from flowmesh.topics.operators import KINDS

        return sorted({subjects.ready(kind.pool) for kind in KINDS.values()})

    async def close(self) -> None:
        clients: list[Any] = [
            *(c._consumer for c in self._consumers),
            *self._groups.values(),
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
