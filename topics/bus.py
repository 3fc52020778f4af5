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
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from flowmesh.topics import codec, streams, subjects, transport
from flowmesh.topics.creds import resolve_url
from flowmesh.topics.messages import DeadLetter
from flowmesh.topics.reach import wait_reachable

if TYPE_CHECKING:
    from flowmesh.topics.kafka_bus import KafkaStreams

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
# Publishes in flight at once in publish_many: enough to pipeline a batch's worth.
PUBLISH_WINDOW = 256
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


class KVWriteError(Exception):
    """The server refused a KV write for another reason than its revision check."""


class Bus:
    def __init__(self, nc: Client, js: JetStreamContext, link: Link | None = None) -> None:
        self.nc = nc
        self.js = js
        self._kv: dict[str, KeyValue] = {}
        self.link = link or Link()
        # the five streams on Kafka instead of JetStream ($FLOWMESH_BUS=kafka, issue 9);
        # KV and the CAS stay on NATS either way (topics/kafka_bus.py says why)
        self.kafka: KafkaStreams | None = None

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
    ) -> Bus:
        """`give_up_after`: seconds to wait for the server before raising
        errors.Unavailable (commands and clients); None waits as long as it takes (a
        component started before its server). `kafka`: bootstrap servers to run the
        streams on Kafka ("" for NATS); None reads $FLOWMESH_BUS / $FLOWMESH_KAFKA."""
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
        if kafka is None:
            kafka = transport.kafka_from_env()
        if kafka:
            from flowmesh.topics.kafka_bus import KafkaStreams  # the kafka extra, only when used

            try:
                bus.kafka = await KafkaStreams.connect(kafka, name)
            except BaseException:
                await nc.close()
                raise
        return bus

    async def kv(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            self._kv[bucket] = await self.js.key_value(bucket)
        return self._kv[bucket]

    async def kv_items(self, bucket: str) -> list[tuple[str, bytes, int]]:
        """(key, value, revision) of every live entry of a bucket, in one pass."""
        # Not kv.keys() + get: one round trip per key. And not nats-py's end marker (None)
        # alone: the watcher can send it before entries the server already pushed (it
        # counts only those its callback has seen), which would make a full bucket look
        # empty. The last entry the server delivers has delta (pending) 0; delete markers
        # are read too, since the newest message of the bucket may be one.
        kv = await self.kv(bucket)
        watcher = await kv.watchall()
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
                if entry.operation is None and entry.value:
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
        headers = {MSG_ID: msg_id} if msg_id else None
        data = codec.encode(msg)
        if self.kafka is not None:
            await self.kafka.publish(subject, data, msg_id)
            return
        await self.retrying(subject, lambda: self.js.publish(subject, data, headers=headers))

    async def publish_many(
        self, items: list[tuple[str, Any, str | None]], retry_s: float = RETRY_S
    ) -> None:
        """Publish several messages pipelined, then wait until all are stored; a
        refused one (a full stream, a conflict) raises its APIError.

        Each is a request with the context's timeout, up to PUBLISH_WINDOW in flight. Not
        nats-py's publish_async: in 2.16 its reply handler raises on a rejected PubAck
        instead of failing the future, which then never resolves (tests/test_bus_bounds.py)."""
        encoded = [(subject, codec.encode(msg), msg_id) for subject, msg, msg_id in items]

        async def send() -> None:
            for i in range(0, len(encoded), PUBLISH_WINDOW):
                await asyncio.gather(
                    *(
                        self.js.publish(subject, data, headers={MSG_ID: msg_id} if msg_id else None)
                        for subject, data, msg_id in encoded[i : i + PUBLISH_WINDOW]
                    )
                )

        if encoded and self.kafka is not None:
            await self.kafka.publish_many(encoded)
        elif encoded:
            await self.retrying(f"{len(encoded)} messages", send, retry_s)

    async def kv_write_many(
        self, bucket: str, writes: list[tuple[str, bytes, int]], timeout: float = 10.0
    ) -> list[int | None]:
        """Compare-and-set writes to KV `bucket`, pipelined: each `(key, value, last)` is
        stored only if the key's last revision is `last` (0: only if it does not exist).
        Per write, the revision it was stored at, or None when the check failed (another
        writer got there first). One round trip's wait for the lot, not one per key.

        nats-py's `publish_async` cannot report a failed check (and with 2.16 its
        future never resolves on one), so each write is a request with its own reply:
        the server's answer says which writes were refused. A write whose answer was
        lost (timeout, a nats restart) is sent again; if the first one landed, the
        repeat fails its check and reads as a conflict, which callers resolve by
        reading the entry (they must: a conflict may be their own earlier write)."""
        out: list[int | None] = [None] * len(writes)

        async def one(i: int, key: str, value: bytes, last: int) -> None:
            subject = f"$KV.{bucket}.{key}"
            headers = {EXPECTED_LAST_SUBJECT_SEQ: str(last)}
            msg = await self.retrying(
                "kv write",
                lambda: self.nc.request(subject, value, timeout=timeout, headers=headers),
            )
            try:
                reply = json.loads(msg.data)
            except ValueError as exc:
                raise KVWriteError(f"{subject}: unreadable reply {msg.data[:200]!r}") from exc
            error = reply.get("error")
            if error is None:
                out[i] = int(reply["seq"])
            elif error.get("err_code") not in WRONG_LAST_SEQUENCE:
                raise KVWriteError(f"{subject}: {error.get('description', error)}")

        for start in range(0, len(writes), KV_WRITE_WINDOW):
            part = writes[start : start + KV_WRITE_WINDOW]
            await asyncio.gather(
                *(one(start + j, k, v, last) for j, (k, v, last) in enumerate(part))
            )
        return out

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
        # Not drain(): components stop their loops first, and anything still queued is
        # unacked and will be redelivered, so waiting for queues to empty only hangs.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.flush(), 2.0)
        if self.kafka is not None:
            await self.kafka.close()
        await self.nc.close()


def _with_fabric_creds(url: str) -> str:
    """`url` with the fabric credentials of $FLOWMESH_CREDS when it carries none: every
    operator command (status, cost, lineage, cache, ...) then works against a server
    that requires them, as the engine and workers already do."""
    path = os.environ.get("FLOWMESH_CREDS")
    if not path or any(urlparse(u.strip()).password for u in url.split(",")):
        return url
    return resolve_url(url, path)
