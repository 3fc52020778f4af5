"""The NATS JetStream connection every component uses, and the few operations on it.

Kept deliberately thin: subjects, schemas and stream configs live beside it, so a second
transport (Kafka, issue 9) implements the same calls against the same contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from topics import codec, streams, subjects
from topics.messages import DeadLetter

log = structlog.get_logger("flowmesh.bus")

MSG_ID = "Nats-Msg-Id"
T = TypeVar("T")


class Bus:
    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self._kv: dict[str, KeyValue] = {}
        self._closing = {"now": False}  # read by the disconnect callback

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        layout: streams.Layout | None = None,
        connect_timeout: float = 5.0,
    ) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc), client=name)

        closing = {"now": False}

        async def on_disconnect() -> None:
            if not closing["now"]:
                log.warning("nats disconnected", client=name)

        async def on_reconnect() -> None:
            log.info("nats reconnected", client=name)

        nc = await nats.connect(
            url,
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
        bus = cls(nc, js)
        bus._closing = closing
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

    async def publish(self, subject: str, msg: Any, msg_id: str | None = None) -> None:
        """Publish to a stream and wait for the server to store it."""
        headers = {MSG_ID: msg_id} if msg_id else None
        await self.js.publish(subject, codec.encode(msg), headers=headers)

    async def publish_many(self, items: list[tuple[str, Any, str | None]]) -> None:
        """Publish several messages pipelined, then wait until all are stored."""
        futures = []
        for subject, msg, msg_id in items:
            headers = {MSG_ID: msg_id} if msg_id else None
            futures.append(await self.js.publish_async(subject, codec.encode(msg), headers=headers))
        if futures:
            await asyncio.gather(*futures)

    async def decode_or_dead_letter(
        self, component: str, subject: str, data: bytes, typ: type[T]
    ) -> T | None:
        """The message as `typ`, or None after recording why it is not one: a shared
        component never dies of a bad message, and never drops one silently."""
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
        self._closing["now"] = True
        # Not drain(): components stop their loops first, and anything still queued is
        # unacked and will be redelivered, so waiting for queues to empty only hangs.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.flush(), 2.0)
        await self.nc.close()
