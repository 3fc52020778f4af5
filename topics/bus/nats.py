"""The NATS JetStream connection every component uses, and the few operations on it.

Kept deliberately thin: subjects, schemas and stream configs live beside it, so a second
transport (Kafka, issue 9) implements the same calls against the same contract.

Every wait on the bus ends: JetStream API calls and KV get/put/create/update carry the
context's timeout (`nc.jetstream(timeout=10.0)`), publishes are requests with it (never
nats-py's publish_async futures, which a rejected PubAck leaves unresolved), watchers
and fetches are read with a timeout, and `retrying` gives an outage RETRY_S at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlparse

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.bus import kv as kvs
from flowmesh.topics.bus import transport
from flowmesh.topics.bus.jetstream import JetStreamTransport
from flowmesh.topics.bus.kv_select import js_select, select_items
from flowmesh.topics.bus.pipeline import ReplyPipeline
from flowmesh.topics.bus.reach import wait_reachable
from flowmesh.topics.config.creds import resolve_url
from flowmesh.topics.messages import DeadLetter

if TYPE_CHECKING:
    from flowmesh.topics.bus.kafka_kv import KafkaKV

log = structlog.get_logger("flowmesh.bus")

MSG_ID = "Nats-Msg-Id"
# A KV write stored only if the key's last revision is this one (0: the key must not
# exist): the compare-and-set nats-py's kv.create/update send, as a plain header.
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# JetStream's err_codes when that check fails: 10071 on a single server, 10164 ("wrong
# last sequence", no number) from a replicated stream whose leader refuses it
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
KV_WRITE_WINDOW = 1024  # compare-and-set writes in flight at once on one connection
T = TypeVar("T")

# Errors that mean "the server is not reachable right now" (a restart, a lost link),
# not "the request was wrong": worth retrying once the client has reconnected. API
# errors such as KeyWrongLastSequenceError are answers and are never retried.
TRANSIENT: tuple[type[Exception], ...] = (
    TimeoutError,  # nats.errors.TimeoutError is one too
    nats.errors.NoRespondersError,  # JetStream not up yet after a server restart
    # a JetStream publish nobody answered: the stream has no leader for the moment (a
    # cluster electing one after a server died), so nothing was stored
    nats.js.errors.NoStreamResponseError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
)
# How long an operation keeps retrying through an outage before giving up.
RETRY_S = 60.0
PUBLISH_TIMEOUT_S = 10.0  # as the JetStream context's own
# JetStream API error codes that come with a 503 but describe the stream, not an outage:
# retrying them only delays a clear failure (maximum messages / bytes exceeded,
# insufficient storage).
DEFINITIVE_503 = frozenset({10047, 10077, 10078})


def is_transient(exc: BaseException) -> bool:
    """Worth retrying once the link is back: an outage, not an answer."""
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return exc.err_code not in DEFINITIVE_503
    return isinstance(exc, TRANSIENT)


@dataclass
class Link:
    """What the connection callbacks observed (they run before the Bus exists)."""

    closing: bool = False
    reconnects: int = 0


class PubAck(msgspec.Struct):
    """JetStream's answer to a publish (a KV write is one): the sequence it was stored
    at, or the error. Decoded typed: json.loads of each answer cost 11 us, this 0.8."""

    seq: int = 0
    error: dict[str, Any] | None = None


_PUB_ACK = msgspec.json.Decoder(PubAck)


class KVWriteError(Exception):
    """The server refused a KV write for another reason than its revision check."""


class NoNats:
    """`nc` and `js` of a Kafka-only Bus ($FLOWMESH_KV=kafka): what still needs NATS
    (the tenant gateway's request/reply, the nats: CAS, lineage's JetStream reads) fails
    with this clear error instead of an AttributeError on None."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"NATS {name!r} asked for in a Kafka-only process (FLOWMESH_KV=kafka): "
            "nothing here is connected to NATS"
        )


class Bus:
    def __init__(self, nc: Client, js: JetStreamContext, link: Link | None = None) -> None:
        self.nc = nc
        self.js = js
        self._kv: dict[str, KeyValue] = {}
        # KV on Kafka ($FLOWMESH_KV=kafka, topics/bus/kafka_kv.py); None: NATS KV
        self.kafka_kv: KafkaKV | None = None
        self.link = link or Link()
        # what carries the five streams: JetStream, or Kafka ($FLOWMESH_BUS=kafka)
        self.transport: transport.Transport = JetStreamTransport(self)
        self._pipeline = ReplyPipeline(nc, lambda: self.link.closing)

    @property
    def has_nats(self) -> bool:
        """False in a Kafka-only process (streams and KV both on Kafka)."""
        return not isinstance(self.nc, NoNats)

    @property
    def connected(self) -> bool:
        """Whether the bus is reachable as far as the client knows (aiokafka reconnects
        by itself and does not say: a Kafka-only bus reads as connected)."""
        return not self.has_nats or self.nc.is_connected

    @property
    def reconnects(self) -> int:
        """How many times the connection came back after a loss. Push consumers (KV
        watchers, ordered consumers) live in the server's memory and die with it: a loop
        that holds one re-creates it when this number changes."""
        return self.link.reconnects

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        layout: streams.Layout | None = None,
        connect_timeout: float = 5.0,
        give_up_after: float | None = None,
        kafka: str | None = None,
        kv: str | None = None,
    ) -> Bus:
        """`give_up_after`: seconds to wait for the server before raising
        errors.Unavailable (commands and clients); None waits as long as it takes (a
        component started before its server). `kafka`: bootstrap servers to run the
        streams on Kafka ("" for NATS); None reads $FLOWMESH_BUS / $FLOWMESH_KAFKA.
        `kv`: where the KV buckets live, "nats" or "kafka" (None: $FLOWMESH_KV); with
        Kafka streams and kv "kafka", nothing connects to NATS (`url` is not used)."""
        if kafka is None:
            kafka = transport.kafka_from_env()
        if kv is None:
            kv = transport.kv_from_env()
        if kafka and kv == "kafka":
            return await cls._connect_kafka_only(kafka, name, give_up_after)
        if give_up_after is not None:
            await wait_reachable(url, give_up_after)

        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc), client=name)

        link = Link()

        async def on_disconnect() -> None:
            if not link.closing:
                log.warning("nats disconnected", client=name)

        async def on_reconnect() -> None:
            link.reconnects += 1
            log.info("nats reconnected", client=name, reconnects=link.reconnects)

        url = _with_fabric_creds(url)
        nc = await nats.connect(
            # "nats://a:4222,nats://b:4222": every server of a cluster, so a client fails
            # over to another when the one it is on dies
            [u.strip() for u in url.split(",") if u.strip()],
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,  # a shared component outlives a nats restart
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        js = nc.jetstream(timeout=10.0)
        await streams.ensure(js, layout)
        bus = cls(nc, js, link)
        if kafka:
            from flowmesh.topics.bus.kafka import KafkaStreams  # the kafka extra, only when used

            try:
                bus.transport = await KafkaStreams.connect(kafka, name)
            except BaseException:
                await nc.close()
                raise
        return bus

    @classmethod
    async def _connect_kafka_only(cls, kafka: str, name: str, give_up_after: float | None) -> Bus:
        """Streams and KV on Kafka (topics/bus/kafka_kv.py), no NATS connection."""
        from flowmesh.topics.bus.kafka import KafkaStreams
        from flowmesh.topics.bus.kafka_kv import KafkaKV

        none = NoNats()
        bus = cls(cast(Client, none), cast(JetStreamContext, none))
        ks = await KafkaStreams.connect(kafka, name, timeout_s=give_up_after or 30.0)
        bus.transport = ks
        bus.kafka_kv = KafkaKV(ks)
        try:
            await bus.kafka_kv.start()
        except BaseException:
            await bus.close()
            raise
        return bus

    async def kv(self, bucket: str) -> kvs.KV:
        if self.kafka_kv is not None:
            return self.kafka_kv.bucket(bucket)
        if bucket not in self._kv:
            self._kv[bucket] = await self.js.key_value(bucket)
        return self._kv[bucket]

    async def kv_keys(self, bucket: str) -> list[str]:
        """The live keys of a bucket. Not nats-py's kv.keys(): it stops at the watcher's
        end marker, which can come before entries the server already pushed (kv_items
        says why), and answered `flowmesh status` with an empty list for a bucket of
        dozens of workflows."""
        if self.kafka_kv is not None:
            return [e.key for e in await self.kafka_kv.items(bucket)]
        return [key for key, _, _ in await self._kv_scan(bucket, meta_only=True)]

    async def kv_items(self, bucket: str) -> list[tuple[str, bytes, int]]:
        """(key, value, revision) of every live entry of a bucket, in one pass."""
        # Not kv.keys() + get: one round trip per key. And not nats-py's end marker (None)
        # alone: the watcher can send it before entries the server already pushed (it
        # counts only those its callback has seen), which would make a full bucket look
        # empty. The last entry the server delivers has delta (pending) 0; delete markers
        # are read too, since the newest message of the bucket may be one.
        if self.kafka_kv is not None:
            return [
                (e.key, e.value or b"", e.revision or 0) for e in await self.kafka_kv.items(bucket)
            ]
        return await self._kv_scan(bucket, meta_only=False)

    async def kv_select(self, bucket: str, patterns: Sequence[str]) -> list[tuple[str, bytes]]:
        """(key, value) of the live entries whose key matches one of `patterns`
        (subject-style: "<op key>.*", "*.<workflow id>"; topics/bus/kv_select.py): on
        NATS filtered by the server, on Kafka-only from the changelog read whole."""
        if not patterns:
            return []
        if self.kafka_kv is not None:
            return select_items(await self.kv_items(bucket), patterns)
        return await js_select(self.js, bucket, patterns)

    async def _kv_scan(self, bucket: str, meta_only: bool) -> list[tuple[str, bytes, int]]:
        await self.kv(bucket)
        kv = self._kv[bucket]
        watcher = await kv.watchall(meta_only=meta_only)
        out: list[tuple[str, bytes, int]] = []
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=10.0)
                except TimeoutError as exc:
                    # never a partial answer: a caller (gc) would take what it did not
                    # see for garbage
                    raise RuntimeError(f"timed out reading KV bucket {bucket}") from exc
                if entry is None:
                    status = await kv.status()
                    if not status.stream_info.state.messages:
                        break  # an empty bucket: nothing will come
                    continue
                if entry.operation is None and (meta_only or entry.value):
                    out.append((entry.key, entry.value, entry.revision or 0))
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        return out

    async def retrying(
        self, what: str, call: Callable[[], Awaitable[T]], retry_s: float = RETRY_S
    ) -> T:
        """`call()`, retried through a lost connection for up to `retry_s` seconds.

        Only for calls that are safe to repeat: publishes with a message id (JetStream
        drops the duplicate), reads, and compare-and-set writes (a repeat of one that
        landed fails its revision check, which the caller already handles)."""
        deadline = time.monotonic() + retry_s
        delay = 0.1
        while True:
            try:
                return await call()
            except TRANSIENT as exc:
                if (
                    not is_transient(exc)
                    or self.link.closing
                    or time.monotonic() + delay > deadline
                ):
                    raise
                log.warning("nats unavailable; retrying", what=what, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def publish(self, subject: str, msg: Any, msg_id: str | None = None) -> None:
        """Publish to a stream and wait for the server to store it (through a short
        outage: with a msg_id a repeat is dropped by the server as a duplicate)."""
        await self.transport.publish(subject, codec.encode(msg), msg_id)

    async def publish_many(
        self, items: list[tuple[str, Any, str | None]], retry_s: float = RETRY_S
    ) -> None:
        """Publish several messages pipelined, then wait until all are stored; a
        refused one (a full stream, a conflict) raises its APIError."""
        encoded = [(subject, codec.encode(msg), msg_id) for subject, msg, msg_id in items]
        if encoded:
            await self.transport.publish_many(encoded, retry_s)

    async def js_publish_many(
        self, items: list[tuple[str, bytes, str | None]], window: int, retry_s: float
    ) -> None:
        """JetStream publishes pipelined (topics/bus/pipeline.py), `window` in flight; a
        refused one raises its APIError. Each carries its message id, so a repeat after
        a lost answer is dropped by the server."""
        requests = [
            (subject, data, {MSG_ID: msg_id} if msg_id else None) for subject, data, msg_id in items
        ]
        for start in range(0, len(requests), window):
            replies = await self._requests(
                requests[start : start + window], PUBLISH_TIMEOUT_S, retry_s
            )
            for reply in replies:
                if reply.error is not None:
                    nats.js.errors.APIError.from_error(reply.error)  # raises it

    async def kv_write_many(
        self, bucket: str, writes: list[tuple[str, bytes, int]], timeout: float = 10.0
    ) -> list[int | None]:
        """Compare-and-set writes to KV `bucket`, pipelined: each `(key, value, last)` is
        stored only if the key's last revision is `last` (0: only if it does not exist).
        Per write, the revision it was stored at, or None when the check failed (another
        writer got there first). One round trip's wait for the lot, not one per key.

        Each write is a request with its own reply, so the server's answers say which
        writes were refused (nats-py's `publish_async` cannot report a failed check). A
        write whose answer was lost (timeout, a nats restart) is sent again; if the first
        one landed, the repeat fails its check and reads as a conflict, which callers
        resolve by reading the entry (they must: a conflict may be their own earlier
        write)."""
        if self.kafka_kv is not None:
            return await self.kafka_kv.write_many(bucket, writes, timeout)
        out: list[int | None] = [None] * len(writes)
        for start in range(0, len(writes), KV_WRITE_WINDOW):
            part = writes[start : start + KV_WRITE_WINDOW]
            requests = [
                (f"$KV.{bucket}.{key}", value, {EXPECTED_LAST_SUBJECT_SEQ: str(last)})
                for key, value, last in part
            ]
            replies = await self._requests(requests, timeout, RETRY_S)
            for j, reply in enumerate(replies):
                error = reply.error
                if error is None:
                    out[start + j] = reply.seq
                elif error.get("err_code") not in WRONG_LAST_SEQUENCE:
                    key = part[j][0]
                    raise KVWriteError(f"$KV.{bucket}.{key}: {error.get('description', error)}")
        return out

    async def _requests(
        self,
        requests: Sequence[tuple[str, bytes, dict[str, str] | None]],
        timeout: float,
        retry_s: float,
    ) -> list[PubAck]:
        """JetStream's answers to pipelined requests (topics/bus/pipeline.py). An answer
        that means "not now" (a 503 that is not about the stream's limits: no leader
        yet) sends its request again, within `retry_s`, like a lost one."""
        out: list[PubAck] = [PubAck() for _ in requests]
        todo = list(range(len(requests)))
        deadline = time.monotonic() + retry_s
        delay = 0.1
        while True:
            left = max(0.0, deadline - time.monotonic())
            msgs = await self._pipeline.request_many([requests[i] for i in todo], timeout, left)
            again: list[int] = []
            error: dict[str, Any] = {}
            for i, msg in zip(todo, msgs, strict=True):
                try:
                    reply = _PUB_ACK.decode(msg.data)
                except msgspec.DecodeError as exc:
                    subject = requests[i][0]
                    raise KVWriteError(f"{subject}: unreadable reply {msg.data[:200]!r}") from exc
                error = reply.error or {}
                if error.get("code") == 503 and error.get("err_code") not in DEFINITIVE_503:
                    again.append(i)
                    continue
                out[i] = reply
            if not again:
                return out
            if self.link.closing or time.monotonic() + delay > deadline:
                nats.js.errors.APIError.from_error(error)  # raises it
            log.warning("jetstream busy; sending again", requests=len(again), error=error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            todo = again

    async def decode_or_dead_letter(
        self, component: str, subject: str, data: bytes, typ: type[T]
    ) -> T | None:
        """The message as `typ`, or None after recording why it is not one: a shared
        component never dies of a bad message, and never drops one silently. Oversized
        ones are refused before decoding: every consumer gets the same limit."""
        if len(data) > streams.MAX_MESSAGE_BYTES:
            reason = f"message too large: {len(data)} bytes > {streams.MAX_MESSAGE_BYTES}"
            await self.dead_letter(component, subject, reason, data)
            return None
        try:
            return codec.decode(data, typ)
        except codec.DecodeError as exc:
            await self.dead_letter(component, subject, str(exc), data)
            return None

    async def dead_letter(self, component: str, subject: str, reason: str, payload: bytes) -> None:
        """Record a message a component could not use; never raises into the caller."""
        letter = DeadLetter(
            subject=subject,
            reason=reason[:2000],
            component=component,
            payload_head=payload[:512].decode("utf-8", "replace"),
            size=len(payload),
            at=time.time(),
        )
        log.warning("dead letter", component=component, subject=subject, reason=reason[:200])
        try:
            await self.publish(subjects.dlq(component), letter)
        except Exception as exc:  # the component must survive a failing DLQ publish
            log.error("dead letter publish failed", error=str(exc))

    async def close(self) -> None:
        self.link.closing = True
        if self.kafka_kv is not None:
            await self.kafka_kv.close()
        if not self.has_nats:
            await self.transport.close()
            return
        # Not drain(): components stop their loops first, and anything still queued is
        # unacked and will be redelivered, so waiting for queues to empty only hangs.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.flush(), 2.0)
        await self.transport.close()
        await self.nc.close()


def _with_fabric_creds(url: str) -> str:
    """`url` with the fabric credentials of $FLOWMESH_CREDS when it carries none: every
    operator command (status, cost, lineage, cache, ...) then works against a server
    that requires them, as the engine and workers already do."""
    path = os.environ.get("FLOWMESH_CREDS")
    if not path or any(urlparse(u.strip()).password for u in url.split(",")):
        return url
    return resolve_url(url, path)
