"""KV buckets on Kafka: a compacted changelog topic per bucket, each partition owned by
one writer that applies every write to it in order (the state-store pattern of Kafka
Streams), so create-if-absent and compare-and-set hold by construction.

Topics of bucket B, each with `partitions` partitions; a key lives on partition
crc32(key) % partitions of both:
- `fm.kv.B`: the changelog, compacted (cleanup.policy=compact): record key = KV key,
  value = the value, a tombstone (no value) for a deletion. A key's revision is its
  record's offset + 1, so it grows with every write of the key.
- `fm.kv.B.req`: the writes (and reads) clients ask for, each naming the client's reply
  topic `fm.kv.reply.<client>` and a deadline.

The owner (`KVOwner`, run by the engine process that runs the scheduler) restores each partition's
table from the changelog, then reads the request partitions in order: it applies a
batch against the table (a create of a key with a value, an update or delete whose
`last` is not the key's revision: a conflict), writes the changelog records, waits until
the broker stored them, then replies with the revisions and commits the request offsets.
A request whose deadline passed is dropped unapplied: its client has already reported a
timeout, and must not see it happen later.

Reads: `get` goes through the owner like a write (it answers from its table, so a read
sees every write acknowledged before it); watchers and scans (`items`) read the
changelog itself up to its end at the time of the call, then (watchers) follow it.

What differs from NATS KV (the guarantees):
- One owner per bucket: a second one started while the first runs is not fenced (Kafka
  Streams fences a zombie with a transactional producer's epoch; here two owners would
  both apply, and compare-and-set would no longer be exact). The engine runs the only one.
- A write acknowledged to its client is on the changelog with acks=all, as a KV write
  acknowledged by JetStream is in its stream; a request whose owner died before
  committing it is applied again on restart, in order: a create or update then reads
  as a conflict, which callers already resolve by reading the entry (on NATS the same
  happens when a lost answer makes a client send a write again).
- No TTL: entries of TTL buckets (worker heartbeats, gateways) stay until deleted; the
  readers that care age them by the time inside the value.
- No history, no purge: a bucket keeps one value per key, as every FlowMesh bucket does.
- Latency: a get or a write is two topic hops (request, reply) instead of one round
  trip to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from flowmesh.topics import streams
from flowmesh.topics.bus import kv
from flowmesh.topics.bus.kafka import FETCH_WAIT_MS, OFFSET_TIMEOUT_S, KafkaStreams

log = structlog.get_logger("flowmesh.kafka_kv")

PARTITIONS = 4  # per bucket; a key's partition is fixed by it, so never change it live
TOPIC_PREFIX = "fm.kv."
REPLY_PREFIX = "fm.kv.reply."
OWNER_GROUP = "fm-kv-owner"
COMPACTED = {"cleanup.policy": "compact"}
REQUEST_TIMEOUT_S = 10.0
# How long a read keeps asking while no owner answers: longer than a supervised engine
# restart (process start, then every table restored), so a client's `get` outlasts one,
# as it would on NATS, where the server and not the engine answers. A write is not asked
# again: its caller decides, as after a lost answer on NATS.
READ_PATIENCE_S = 30.0
# How long the broker may hold a fetch of requests (the owner) or replies (a client).
# tansu 0.6 holds an empty fetch for the whole wait even when a record arrives, so a
# request and its reply each waited half of it on average: an awaited KV call took 53
# ms at FETCH_WAIT_MS (100). Two idle consumers per process ask this often.
REQUEST_WAIT_MS = 10
RESTORE_TIMEOUT_S = 60.0  # reading one changelog partition to its end
Op = Literal["get", "create", "update", "put", "delete"]
ALL_BUCKETS = (
    streams.KV_OPS,
    streams.KV_WF,
    streams.KV_WORKERS,
    streams.KV_EXECUTORS,
    streams.KV_REQUESTS,
    streams.KV_MODELS,
    streams.KV_FABRIC,
    streams.KV_TENANT_USE,
    streams.KV_GATEWAYS,
)


def changelog_topic(bucket: str) -> str:
    return TOPIC_PREFIX + bucket


def request_topic(bucket: str) -> str:
    return TOPIC_PREFIX + bucket + ".req"


def partition_of(key: str, partitions: int) -> int:
    """The partition of a key, the same on every client and the owner (not Kafka's
    murmur2: every record names its partition)."""
    return zlib.crc32(key.encode()) % partitions


class Request(msgspec.Struct, array_like=True, frozen=True):
    id: int
    reply: str
    op: str
    key: str
    value: bytes | None = None
    last: int | None = None  # update/delete: the revision the key must have
    deadline: float = 0.0  # Unix seconds; past it the owner drops the request


class Reply(msgspec.Struct, array_like=True):
    id: int
    status: str  # "ok", "missing" (no such key), "conflict" (revision check failed)
    revision: int = 0
    value: bytes | None = None


_REQ_DEC = msgspec.msgpack.Decoder(Request)
_REPLY_DEC = msgspec.msgpack.Decoder(Reply)
_ENC = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class KafkaEntry:
    key: str
    value: bytes | None
    revision: int | None
    delta: int | None = None
    operation: str | None = None


# --- the client side: every process that uses KV ----------------------------------------


class KafkaKV:
    """Requests to the owner and reads of the changelogs, over one Kafka connection."""

    def __init__(self, ks: KafkaStreams, partitions: int = PARTITIONS, owns: bool = False):
        self.ks = ks
        self.partitions = partitions
        self._owns = owns  # close ks with this
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._buckets: set[str] = set()
        self.reply_topic = REPLY_PREFIX + uuid.uuid4().hex[:16]
        self._replies: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, bootstrap: str, name: str, partitions: int = PARTITIONS) -> KafkaKV:
        self = cls(await KafkaStreams.connect(bootstrap, name), partitions, owns=True)
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def start(self) -> None:
        await self.ks.ensure_topic(self.reply_topic)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.ks.bootstrap,
            client_id=self.ks.client_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=REQUEST_WAIT_MS,
        )
        await asyncio.wait_for(consumer.start(), OFFSET_TIMEOUT_S)
        self._replies = consumer
        tp = TopicPartition(self.reply_topic, 0)
        consumer.assign([tp])
        # a new topic: every reply on it is for this client. Its position read here, so
        # the consumer has the topic's leader before the first request goes out
        await asyncio.wait_for(consumer.seek_to_beginning(tp), OFFSET_TIMEOUT_S)
        await asyncio.wait_for(consumer.position(tp), OFFSET_TIMEOUT_S)
        self._reader = asyncio.create_task(self._read_replies(consumer))

    async def _read_replies(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                got = await consumer.getmany(timeout_ms=1000)
            except Exception as exc:  # the broker is away: aiokafka reconnects
                log.warning("reading kv replies failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            for records in got.values():
                for rec in records:
                    try:
                        reply = _REPLY_DEC.decode(rec.value or b"")
                    except msgspec.DecodeError:
                        log.warning("undecodable kv reply", topic=rec.topic, offset=rec.offset)
                        continue
                    fut = self._waiting.pop(reply.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)

    def bucket(self, name: str) -> KafkaBucket:
        return KafkaBucket(self, name)

    async def ensure_bucket(self, bucket: str) -> None:
        if bucket in self._buckets:
            return
        await ensure_bucket_topics(self.ks, bucket, self.partitions)
        # the topics' metadata read afresh: a producer that knew of them from before
        # they had a leader held its first records until they timed out (tansu 0.6)
        await asyncio.wait_for(self.ks.producer.client.force_metadata_update(), OFFSET_TIMEOUT_S)
        self._buckets.add(bucket)

    async def request_many(
        self,
        bucket: str,
        ops: Sequence[tuple[Op, str, bytes | None, int | None]],
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> list[Reply]:
        """The owner's replies to `(op, key, value, last)` requests sent at once; raises
        TimeoutError when one did not come within `timeout` (the write may or may not
        have been applied, as a lost answer on NATS)."""
        await self.ensure_bucket(bucket)
        deadline = time.time() + timeout
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Reply]] = []
        rids: list[int] = []
        sends = []
        topic = request_topic(bucket)
        try:
            for op, key, value, last in ops:
                rid = next(self._ids)
                fut: asyncio.Future[Reply] = loop.create_future()
                self._waiting[rid] = fut
                rids.append(rid)
                futures.append(fut)
                req = Request(rid, self.reply_topic, op, key, value, last, deadline)
                sends.append(
                    await self.ks.producer.send(
                        topic,
                        _ENC.encode(req),
                        key=key.encode(),
                        partition=partition_of(key, self.partitions),
                    )
                )
            try:
                async with asyncio.timeout(timeout):
                    return list(await asyncio.gather(*map(_answer, sends, futures)))
            except TimeoutError:
                answered = sum(f.done() for f in futures)
                log.warning("kv request timed out", bucket=bucket, answered=answered, n=len(ops))
                raise
        finally:
            for rid, fut in zip(rids, futures, strict=True):
                # what is still registered: a timeout, a failed send
                self._waiting.pop(rid, None)
                if not fut.done():
                    fut.cancel()

    async def request(
        self,
        bucket: str,
        op: Op,
        key: str,
        value: bytes | None = None,
        last: int | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> Reply:
        """One request's reply. A `get` is asked again (a fresh request: the owner drops
        the expired one unapplied) until READ_PATIENCE_S have passed."""
        give_up = time.monotonic() + max(timeout, READ_PATIENCE_S)
        while True:
            try:
                return (await self.request_many(bucket, [(op, key, value, last)], timeout))[0]
            except TimeoutError:
                if op != "get" or time.monotonic() + timeout > give_up:
                    raise
                log.info("kv owner not answering; asking again", bucket=bucket)

    async def write_many(
        self, bucket: str, writes: list[tuple[str, bytes, int]], timeout: float = REQUEST_TIMEOUT_S
    ) -> list[int | None]:
        """Bus.kv_write_many's compare-and-set writes: `(key, value, last)`, stored only
        if the key's revision is `last` (0: only if it does not exist); per write its
        revision, or None when the check failed."""
        ops: list[tuple[Op, str, bytes | None, int | None]] = [
            ("create", key, value, None) if last == 0 else ("update", key, value, last)
            for key, value, last in writes
        ]
        out: list[int | None] = []
        for reply in await self.request_many(bucket, ops, timeout) if ops else []:
            out.append(reply.revision if reply.status == "ok" else None)
        return out

    async def items(self, bucket: str, timeout: float = REQUEST_TIMEOUT_S) -> list[KafkaEntry]:
        """Every live entry of the bucket as of now: its changelog read to its end."""
        watcher = await self.watcher(bucket, None)
        try:
            return await watcher.initial(timeout)
        finally:
            await watcher.stop()

    async def watcher(self, bucket: str, key: str | None) -> ChangelogWatcher:
        await self.ensure_bucket(bucket)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.ks.bootstrap,
            client_id=self.ks.client_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        await asyncio.wait_for(consumer.start(), OFFSET_TIMEOUT_S)
        topic = changelog_topic(bucket)
        if key is None:
            tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        else:
            tps = [TopicPartition(topic, partition_of(key, self.partitions))]
        try:
            consumer.assign(tps)
            await asyncio.wait_for(consumer.seek_to_beginning(*tps), OFFSET_TIMEOUT_S)
            ends = await self.ks.true_ends(tps)
        except BaseException:
            await consumer.stop()
            raise
        return ChangelogWatcher(consumer, ends, key)

    async def close(self) -> None:
        await _halt(self._reader, self._replies)
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        with contextlib.suppress(Exception):  # nobody will read it again
            await asyncio.wait_for(
                self.ks._admin.delete_topics([self.reply_topic]), OFFSET_TIMEOUT_S
            )
        if self._owns:
            await self.ks.close()


class ChangelogWatcher:
    """A changelog read from its start: the latest value of each key up to the end
    offsets read when it was made (then None), then every record as it comes."""

    def __init__(
        self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], key: str | None
    ) -> None:
        self._consumer = consumer
        self._ends = ends
        self._key = key
        self._queue: list[kv.Entry | None] = []
        self._started = False

    def _entry(self, rec: ConsumerRecord[bytes, bytes], delta: int | None = None) -> KafkaEntry:
        key = (rec.key or b"").decode()
        op = "DEL" if rec.value is None else None
        return KafkaEntry(key, rec.value, rec.offset + 1, delta, op)

    async def initial(self, timeout: float) -> list[KafkaEntry]:
        """The live entries up to the end offsets, folded (the latest value per key);
        raises TimeoutError if the changelog could not be read that far in time."""
        latest: dict[str, KafkaEntry] = {}
        todo = {tp for tp, end in self._ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while todo:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reading the KV changelog {sorted(t.topic for t in todo)}")
            got = await self._consumer.getmany(*todo, timeout_ms=int(min(left, 1.0) * 1000))
            for tp, records in got.items():
                for rec in records:
                    if rec.offset < self._ends[tp]:
                        entry = self._entry(rec)
                        if self._key is None or entry.key == self._key:
                            latest[entry.key] = entry
                    else:  # past the end read at the start: for updates()
                        self._consumer.seek(tp, rec.offset)
                        break
                if records and records[-1].offset + 1 >= self._ends[tp]:
                    todo.discard(tp)
        self._started = True
        return [e for e in latest.values() if e.value is not None]

    async def updates(self, timeout: float = 5.0) -> kv.Entry | None:
        if not self._started:
            live = await self.initial(max(timeout, REQUEST_TIMEOUT_S))
            n = len(live)
            self._queue = [
                KafkaEntry(e.key, e.value, e.revision, n - 1 - i) for i, e in enumerate(live)
            ]
            self._queue.append(None)
        deadline = time.monotonic() + timeout
        while not self._queue:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            got = await self._consumer.getmany(timeout_ms=int(left * 1000))
            for records in got.values():
                for rec in records:
                    entry = self._entry(rec)
                    if self._key is None or entry.key == self._key:
                        self._queue.append(entry)
        return self._queue.pop(0)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._consumer.stop()


async def _answer(sent: asyncio.Future[object], reply: asyncio.Future[Reply]) -> Reply:
    """A request's reply, as soon as it comes: the owner read the request from its topic,
    so it was stored, whatever the produce's own acknowledgement is still doing (tansu
    0.6 sometimes holds that for the producer's whole request timeout, 10 s, after the
    record is stored: a worker's heartbeat then missed its liveness window). A send that
    fails before any reply fails the request at once."""
    await asyncio.wait((sent, reply), return_when=asyncio.FIRST_COMPLETED)
    if not reply.done():
        sent.result()  # raises the send's error
        return await reply
    if not sent.done():
        # finished later or failed: either way nobody waits for it
        sent.add_done_callback(_retrieved)
    return reply.result()


def _retrieved(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass
class KafkaBucket:
    """One bucket, as `kv.KV`: every call is a request to the owner."""

    client: KafkaKV
    name: str
    timeout: float = REQUEST_TIMEOUT_S

    async def _ask(
        self, op: Op, key: str, value: bytes | None = None, last: int | None = None
    ) -> Reply:
        return await self.client.request(self.name, op, key, value, last, self.timeout)

    async def get(self, key: str) -> kv.Entry:
        reply = await self._ask("get", key)
        if reply.status != "ok":
            raise kv.KeyNotFound()
        return KafkaEntry(key, reply.value, reply.revision)

    async def create(self, key: str, value: bytes) -> int:
        reply = await self._ask("create", key, value)
        if reply.status != "ok":
            raise kv.wrong_revision(f"{self.name}.{key} exists")
        return reply.revision

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        reply = await self._ask("update", key, value, last or 0)
        if reply.status != "ok":
            raise kv.wrong_revision(f"{self.name}.{key} is not at revision {last}")
        return reply.revision

    async def put(self, key: str, value: bytes) -> int:
        reply = await self._ask("put", key, value)
        return reply.revision

    async def delete(self, key: str, last: int | None = None) -> bool:
        reply = await self._ask("delete", key, None, last)
        if reply.status == "conflict":
            raise kv.wrong_revision(f"{self.name}.{key} is not at revision {last}")
        return True

    async def watch(self, keys: str) -> ChangelogWatcher:
        return await self.client.watcher(self.name, keys)

    async def watchall(self) -> ChangelogWatcher:
        return await self.client.watcher(self.name, None)


async def ensure_bucket_topics(ks: KafkaStreams, bucket: str, partitions: int) -> None:
    await ks.ensure_topic(changelog_topic(bucket), partitions, COMPACTED)
    await ks.ensure_topic(request_topic(bucket), partitions)


# --- the owner: applies every write, in order, per partition ----------------------------


@dataclass
class Slot:
    """A key's value in the owner's table. `revision` is 0 while its changelog record
    is in flight: no client can know it yet, so no update names it."""

    value: bytes
    revision: int = 0


@dataclass
class _Pending:
    """A reply to send once the batch's changelog records are stored."""

    req: Request
    status: str
    slot: Slot | None = None  # ok: the slot whose revision the reply carries
    value: bytes | None = None  # get: the value it read
    sent: asyncio.Future[object] | None = field(default=None, repr=False)


class KVOwner:
    """The one writer of some buckets: restores their tables from the changelogs, then
    applies the requests in order. Run by the engine (`flowmesh up`)."""

    def __init__(self, ks: KafkaStreams, buckets: Sequence[str], partitions: int = PARTITIONS):
        self.ks = ks
        self.buckets = list(buckets)
        self.partitions = partitions
        self.tables: dict[tuple[str, int], dict[str, Slot]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.applied = 0  # requests applied, for tests and logs
        self._reply_topics: set[str] = set()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        for bucket in self.buckets:
            await ensure_bucket_topics(self.ks, bucket, self.partitions)
        await self._restore_all()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.ks.bootstrap,
            client_id=self.ks.client_id,
            group_id=OWNER_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=REQUEST_WAIT_MS,
        )
        await asyncio.wait_for(consumer.start(), OFFSET_TIMEOUT_S)
        self._consumer = consumer
        tps = [
            TopicPartition(request_topic(b), p)
            for b in self.buckets
            for p in range(self.partitions)
        ]
        consumer.assign(tps)
        for tp in tps:
            committed = await asyncio.wait_for(consumer.committed(tp), OFFSET_TIMEOUT_S)
            consumer.seek(tp, committed or 0)
        self._task = asyncio.create_task(self._run(consumer))
        log.info("kv owner started", buckets=self.buckets, partitions=self.partitions)

    async def _restore_all(self) -> None:
        """Every bucket's tables at once: no request is answered until all are back, and
        one after another they took 0.5 s each (a fetch wait per empty changelog), the
        whole time clients of a restarted engine waited on every KV call."""
        async with asyncio.TaskGroup() as restores:
            for bucket in self.buckets:
                restores.create_task(self._restore(bucket))

    async def _restore(self, bucket: str) -> None:
        """Each partition's table from its changelog, read to the end it has now."""
        topic = changelog_topic(bucket)
        tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        for tp in tps:
            self.tables[(bucket, tp.partition)] = {}
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.ks.bootstrap,
            client_id=self.ks.client_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        await asyncio.wait_for(reader.start(), OFFSET_TIMEOUT_S)
        try:
            reader.assign(tps)
            await asyncio.wait_for(reader.seek_to_beginning(*tps), OFFSET_TIMEOUT_S)
            watcher = ChangelogWatcher(reader, await self.ks.true_ends(tps), None)
            n = 0
            for entry in await watcher.initial(RESTORE_TIMEOUT_S):
                assert entry.value is not None and entry.revision is not None
                part = partition_of(entry.key, self.partitions)
                self.tables[(bucket, part)][entry.key] = Slot(entry.value, entry.revision)
                n += 1
        finally:
            await reader.stop()
        log.info("kv bucket restored", bucket=bucket, keys=n)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                got = await consumer.getmany(timeout_ms=1000, max_records=1024)
                if got:
                    await self._apply(consumer, got)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # the broker is away (aiokafka reconnects): the batch's requests were not
                # committed, so they are applied again
                log.warning("kv owner batch failed; applying it again", error=repr(exc))
                await asyncio.sleep(0.5)
                await self._recover(consumer)

    async def _recover(self, consumer: AIOKafkaConsumer) -> None:
        """After a failed batch, as after a restart: the tables as the changelog has them
        (the batch changed them, and may not have stored its records), and the requests
        from the committed offsets on."""
        while True:
            try:
                await self._restore_all()
                for tp in consumer.assignment():
                    committed = await asyncio.wait_for(consumer.committed(tp), OFFSET_TIMEOUT_S)
                    consumer.seek(tp, committed or 0)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kv owner cannot recover yet", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _apply(
        self,
        consumer: AIOKafkaConsumer,
        got: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    ) -> None:
        now = time.time()
        pending: list[_Pending] = []
        writes: list[tuple[Slot | None, asyncio.Future[object], str, int]] = []
        commits: dict[TopicPartition, int] = {}
        for tp, records in got.items():
            bucket = tp.topic.removeprefix(TOPIC_PREFIX).removesuffix(".req")
            table = self.tables[(bucket, tp.partition)]
            for rec in records:
                commits[tp] = rec.offset + 1
                try:
                    req = _REQ_DEC.decode(rec.value or b"")
                except msgspec.DecodeError:
                    log.warning("undecodable kv request", topic=tp.topic, offset=rec.offset)
                    continue
                if req.deadline and req.deadline < now:
                    continue  # its client gave up: never applied
                p = self._one(table, req)
                pending.append(p)
                if p.status == "ok" and req.op != "get":
                    slot = table.get(req.key)
                    fut = await self.ks.producer.send(
                        changelog_topic(bucket),
                        slot.value if slot is not None else None,
                        key=req.key.encode(),
                        partition=tp.partition,
                    )
                    p.sent = fut
                    writes.append((slot, fut, req.key, tp.partition))
        # every changelog record stored before any reply: a reply is a promise
        async with asyncio.timeout(OFFSET_TIMEOUT_S):
            stored = await asyncio.gather(*(w[1] for w in writes))
        for (slot, _, _, _), md in zip(writes, stored, strict=True):
            if slot is not None:
                slot.revision = md.offset + 1  # type: ignore[attr-defined]
        revisions = {id(w[1]): md.offset + 1 for w, md in zip(writes, stored, strict=True)}  # type: ignore[attr-defined]
        replies = []
        new = {p.req.reply for p in pending} - self._reply_topics
        if new:
            # a client's reply topic this producer has not sent to: its metadata read
            # afresh first. Without it, the first reply to a client whose topic was made
            # before this producer started waited until the send timed out (tansu 0.6:
            # the producer held the topic's metadata from before it had a leader)
            await asyncio.wait_for(
                self.ks.producer.client.force_metadata_update(), OFFSET_TIMEOUT_S
            )
            self._reply_topics |= new
        for p in pending:
            if p.status != "ok":
                reply = Reply(p.req.id, p.status)
            elif p.req.op == "get":
                assert p.slot is not None
                reply = Reply(p.req.id, "ok", p.slot.revision, p.value)
            else:
                assert p.sent is not None
                reply = Reply(p.req.id, "ok", revisions[id(p.sent)])
            replies.append(
                await self.ks.producer.send(p.req.reply, _ENC.encode(reply), partition=0)
            )
        async with asyncio.timeout(OFFSET_TIMEOUT_S):
            await asyncio.gather(*replies)
            await consumer.commit(commits)
        self.applied += len(pending)

    def _one(self, table: dict[str, Slot], req: Request) -> _Pending:
        """Apply one request to the table (in order: this is where create-if-absent
        and compare-and-set are decided)."""
        slot = table.get(req.key)
        if req.op == "get":
            if slot is None:
                return _Pending(req, "missing")
            return _Pending(req, "ok", slot, slot.value)
        if req.op == "create" and slot is not None:
            return _Pending(req, "conflict")
        if req.op == "update" and (slot is None or slot.revision != req.last or not req.last):
            return _Pending(req, "conflict")
        if req.op == "delete":
            if req.last and (slot is None or slot.revision != req.last):
                return _Pending(req, "conflict")
            table.pop(req.key, None)
            return _Pending(req, "ok")
        if req.op not in ("create", "update", "put"):
            log.warning("unknown kv request", op=req.op)
            return _Pending(req, "conflict")
        new = Slot(req.value or b"")
        table[req.key] = new
        return _Pending(req, "ok", new)

    async def stop(self) -> None:
        await _halt(self._task, self._consumer)


async def _halt(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Stop a reading loop and then the consumer it read from, whatever either raises
    on the way out (a client or owner going away has nobody to report it to)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    if consumer is not None:
        with contextlib.suppress(Exception):
            await consumer.stop()
