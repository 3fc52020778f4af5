"""Many JetStream requests in flight on one connection, answered through one reply
subscription: the compare-and-set KV writes and stream publishes of a batch.

Why not `nc.request` per message: each one sets up its own future and timer and is
awaited as a task of its own, which cost the planner and the workers more CPU than the
rest of their per-operator work together (loadgen overhead's profiles: 4.2 of the
engine's 9.0 CPU-seconds, 1.5 of a worker's 4.5). Why not nats-py's `publish_async`: it
cannot report a failed compare-and-set, and in 2.16 its future never resolves on a
rejected PubAck (tests/test_bus_bounds.py).

Here every request of a batch gets the reply subject `<inbox>.<n>`; one wildcard
subscription files each answer under its batch; the batch waits once, for all of them,
with one bound. A request left unanswered (a lost link, a server restart, a stream with
no leader for the moment) is sent again until `retry_s` has passed: callers send only
requests that are safe to repeat (a message id, or a compare-and-set whose repeat fails
its check)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.api
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

NO_RESPONDERS = "503"
# publish errors that mean "not now": the same request is sent again after a pause
SEND_RETRY: tuple[type[Exception], ...] = (
    TimeoutError,  # the wait below: the unanswered are sent again
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
)


# what nats-py itself refuses in a subject (whitespace would inject protocol) and in a
# header key; a request that has any goes through nats-py's own publish, which raises
_SUBJECT_BAD = re.compile(r"[\s]")
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE_BAD = re.compile(r"[\r\n]")


def _command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes | None:
    """The PUB or HPUB protocol command nats-py's publish would queue for this request
    (nats/protocol/command.py), or None when nats-py must build it: a subject or header
    it would refuse or rewrite, whose error is then its own."""
    if not subject or _SUBJECT_BAD.search(subject) or _SUBJECT_BAD.search(reply):
        return None
    if headers is None:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    lines = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        if not _HEADER_KEY.fullmatch(key) or _HEADER_VALUE_BAD.search(value):
            return None
        if value != value.strip():
            return None
        lines.append(b"%s: %s\r\n" % (key.encode(), value.encode()))
    lines.append(b"\r\n")
    hdr = b"".join(lines)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(hdr),
        len(hdr) + len(payload),
        hdr,
        payload,
    )


@dataclass
class _Batch:
    replies: list[Msg | None]
    waiting: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def got(self, i: int, msg: Msg) -> None:
        if self.replies[i] is None:
            self.replies[i] = msg
            self.waiting -= 1
            if self.waiting <= 0:
                self.all_in.set()


def no_responders(msg: Msg) -> bool:
    """The server's own answer that nothing serves the subject (JetStream not up yet,
    or a stream without a leader): nothing was stored."""
    headers = msg.headers
    return headers is not None and headers.get(nats.js.api.Header.STATUS) == NO_RESPONDERS


class ReplyPipeline:
    """Requests sent back to back, their replies collected by one subscription."""

    def __init__(self, nc: Client, closing: Callable[[], bool] = lambda: False) -> None:
        self._nc = nc
        self._closing = closing
        self._prefix = ""
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[_Batch, int]] = {}

    async def _subscribed(self) -> None:
        if self._sub is not None:
            return
        async with self._lock:
            if self._sub is None:
                self._prefix = self._nc.new_inbox()
                self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        try:
            n = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        entry = self._waiting.pop(n, None)
        if entry is not None:  # else a late answer to a request already sent again
            entry[0].got(entry[1], msg)

    async def request_many(
        self,
        requests: Sequence[tuple[str, bytes, dict[str, str] | None]],
        timeout: float,
        retry_s: float,
    ) -> list[Msg]:
        """The reply to each `(subject, payload, headers)`, in order. Raises TimeoutError
        (or NoRespondersError) when some stay unanswered for `retry_s` and a last
        `timeout`."""
        await self._subscribed()
        batch = _Batch([None] * len(requests))
        todo = list(range(len(requests)))
        deadline = time.monotonic() + retry_s
        delay = 0.1
        while todo:
            sent: list[int] = []
            batch.waiting = len(todo)
            batch.all_in.clear()
            try:
                for i in todo:
                    n = self._next
                    self._next += 1
                    self._waiting[n] = (batch, i)
                    sent.append(n)
                await self._send([(requests[i], n) for i, n in zip(todo, sent, strict=True)])
                await asyncio.wait_for(batch.all_in.wait(), timeout)
            except SEND_RETRY:
                pass
            finally:
                for n in sent:
                    self._waiting.pop(n, None)
            todo, refused = [], 0
            for i, msg in enumerate(batch.replies):
                if msg is None or no_responders(msg):
                    refused += msg is not None
                    batch.replies[i] = None
                    todo.append(i)
            if not todo:
                break
            if self._closing() or time.monotonic() + delay > deadline:
                if refused == len(todo):
                    raise nats.errors.NoRespondersError
                raise TimeoutError(f"{len(todo)} of {len(requests)} requests unanswered")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        return [m for m in batch.replies if m is not None]

    async def _send(
        self, items: list[tuple[tuple[str, bytes, dict[str, str] | None], int]]
    ) -> None:
        """Publish each request with its reply subject. On a connected client the
        commands are built here and queued as one write (what nats-py's publish does
        per message, its checks included, was a third of the pipeline's CPU); anything
        else (a reconnect in progress, a payload over the server's limit, a subject
        nats-py would refuse) goes through nats-py's publish, which raises its own
        error."""
        nc = self._nc
        commands: list[bytes] = []
        size = 0
        fast = (
            nc.is_connected
            and not nc.is_draining_pubs
            and hasattr(nc, "_send_command")
            and hasattr(nc, "_flush_pending")
        )
        for (subject, payload, headers), n in items:
            reply = f"{self._prefix}.{n}"
            cmd = (
                _command(subject, reply, payload, headers)
                if fast and len(payload) <= nc.max_payload
                else None
            )
            if cmd is None:
                await self._queue(commands, size)
                commands, size = [], 0
                await nc.publish(subject, payload, reply=reply, headers=headers)
                continue
            commands.append(cmd)
            size += len(payload)
        await self._queue(commands, size)

    async def _queue(self, commands: list[bytes], payload_bytes: int) -> None:
        """Queue built commands on the client as one write and wake its flusher."""
        if not commands:
            return
        nc = self._nc
        nc.stats["out_msgs"] += len(commands)
        nc.stats["out_bytes"] += payload_bytes
        await nc._send_command(b"".join(commands))
        await nc._flush_pending()
