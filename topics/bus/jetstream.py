"""The streams on NATS JetStream: the default `Transport` (topics/bus/transport.py).

The consumers are JetStream durable pull consumers (their configs live in
topics/streams.py), whose messages settle as `Delivery`s with no wrapper in between.
Every call that waits on the server has a bound: the JetStream context's timeout, or the
Bus's `retrying` window through an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from flowmesh.topics import streams, subjects
from flowmesh.topics.bus.transport import Consumer, ConsumerStat, Handler, Record, Stop, StreamStat

if TYPE_CHECKING:
    from flowmesh.topics.bus.nats import Bus

NO_MESSAGE_FOUND = 10057  # JetStream's answer to deleting a message already gone
MSG_ID = "Nats-Msg-Id"
# Publishes in flight at once in publish_many: enough to pipeline a batch's worth.
PUBLISH_WINDOW = 256
FM_STREAMS = (
    streams.STREAM_SUBMIT,
    streams.STREAM_READY,
    streams.STREAM_ASSIGN,
    streams.STREAM_DONE,
    streams.STREAM_DLQ,
)


class OrderedReplay:
    """An ordered push consumer. It lives in the server's memory, so a nats restart
    kills it: after a reconnect it is `stale` and its reader makes a new one from the
    next sequence (nats-py would only notice after two missed idle heartbeats, and its
    own re-creation is not retried if that one fails)."""

    def __init__(self, bus: Bus, sub: Any) -> None:
        self._bus = bus
        self._sub = sub
        self._reconnects = bus.reconnects

    @property
    def stale(self) -> bool:
        return self._bus.reconnects != self._reconnects

    async def fetch(self, batch: int, timeout: float) -> list[Record]:
        out = [_record(await self._sub.next_msg(timeout=timeout))]
        while len(out) < batch and self._sub.pending_msgs:
            out.append(_record(await self._sub.next_msg(timeout=timeout)))
        return out

    async def unsubscribe(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


def _record(msg: Any) -> Record:
    meta = msg.metadata
    return Record(meta.sequence.stream, msg.subject, msg.data, meta.timestamp.timestamp())


class JetStreamTransport:
    name = "nats"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        headers = {MSG_ID: msg_id} if msg_id else None
        js = self.bus.js
        await self.bus.retrying(subject, lambda: js.publish(subject, data, headers=headers))

    async def publish_many(
        self, items: list[tuple[str, bytes, str | None]], retry_s: float
    ) -> None:
        """Pipelined through the bus's reply subscription (topics/bus/pipeline.py), up
        to PUBLISH_WINDOW in flight. Not nats-py's publish_async: in 2.16 its reply
        handler raises on a rejected PubAck instead of failing the future, which then
        never resolves (tests/test_bus_bounds.py)."""
        if items:
            await self.bus.js_publish_many(items, PUBLISH_WINDOW, retry_s)

    # --- consumers ----------------------------------------------------------------------

    async def replay(
        self, subject: str, after: int = 0, since: float | None = None
    ) -> OrderedReplay:
        if since is not None:
            sub = await self.bus.js.subscribe(
                subject,
                ordered_consumer=True,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_TIME,
                    opt_start_time=datetime.datetime.fromtimestamp(since, tz=datetime.UTC),
                ),
            )
        elif after:
            sub = await self.bus.js.subscribe(
                subject,
                ordered_consumer=True,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
                ),
            )
        else:
            sub = await self.bus.js.subscribe(
                subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
        return OrderedReplay(self.bus, sub)

    async def ready_consumer(self) -> Consumer:
        return await self.bus.js.pull_subscribe(  # type: ignore[no-any-return]
            subjects.READY_ALL,
            durable=streams.SCHEDULER,
            stream=streams.STREAM_READY,
            config=streams.scheduler_consumer(),
        )

    async def assignment_consumer(self, worker: str, slots: int) -> Consumer:
        """The worker's durable pull consumer on fm.assign.<id> (created if missing)."""
        return await self.bus.js.pull_subscribe(  # type: ignore[no-any-return]
            subjects.assign(worker),
            durable=streams.worker_consumer_name(worker),
            stream=streams.STREAM_ASSIGN,
            config=streams.worker_consumer(worker, slots),
        )

    async def assignment_consumer_gone(self, worker: str) -> bool:
        try:
            await self.bus.js.consumer_info(
                streams.STREAM_ASSIGN, streams.worker_consumer_name(worker)
            )
        except NotFoundError:
            return True
        except Exception:
            return False  # the server is unreachable: nothing is known yet
        return False

    async def done_consumer(self, name: str) -> Consumer:
        return await self.bus.js.pull_subscribe(  # type: ignore[no-any-return]
            subjects.DONE,
            durable=name,
            stream=streams.STREAM_DONE,
            config=dataclasses.replace(streams.planner_done_consumer(), durable_name=name),
        )

    # --- the scheduler's view of assignments ----------------------------------------------

    async def take_back(self, worker: str, handle: Handler) -> int:
        """Read by subject straight from the stream (message get, then delete), not
        through a consumer of our own: on a work-queue stream a second consumer filtered
        on fm.assign.<wid> is refused while the worker's exists (err 10100 'filtered
        consumer not unique'), and the worker may have re-created its own in between
        (a false death: it rejoins) or be re-creating it now; ours would also block
        its re-creation. With no consumer of ours neither side can block the other."""
        js = self.bus.js
        name = streams.worker_consumer_name(worker)
        with contextlib.suppress(NotFoundError):
            await self.bus.retrying(
                "delete worker consumer",
                lambda: js.delete_consumer(streams.STREAM_ASSIGN, name),
                retry_s=10.0,
            )
        n = 0
        seq = 1
        while True:
            try:
                raw = await self.bus.retrying(
                    "read back assignment",
                    functools.partial(
                        js.get_msg,
                        streams.STREAM_ASSIGN,
                        seq=seq,
                        subject=subjects.assign(worker),
                        next=True,
                    ),
                    retry_s=10.0,
                )
            except NotFoundError:
                break  # none left at or after seq
            at = raw.seq or seq
            seq = at + 1
            await handle(raw.subject or subjects.assign(worker), raw.data or b"")
            n += 1
            # handled first, deleted after: a crash in between replays it again (safe:
            # commits are compare-and-set), never loses it; gone already (err 10057 'no
            # message found') means a rejoined worker acked it meanwhile
            try:
                await self.bus.retrying(
                    "delete taken-back assignment",
                    functools.partial(js.delete_msg, streams.STREAM_ASSIGN, at),
                    retry_s=10.0,
                )
            except APIError as exc:
                if not isinstance(exc, NotFoundError) and exc.err_code != NO_MESSAGE_FOUND:
                    raise
        return n

    async def assigned_counts(self) -> dict[str, int]:
        info = await self.bus.js.stream_info(
            streams.STREAM_ASSIGN, subjects_filter=subjects.ASSIGN_ALL
        )
        return dict(info.state.subjects or {})

    async def ready_backlog(self, sample: int) -> dict[str, tuple[int, list[bytes]]]:
        js = self.bus.js
        info = await js.stream_info(streams.STREAM_READY, subjects_filter=subjects.READY_ALL)
        out: dict[str, tuple[int, list[bytes]]] = {}
        for subject, n in (info.state.subjects or {}).items():
            head: list[bytes] = []
            seq = info.state.first_seq
            while n and len(head) < min(n, sample):
                try:
                    msg = await js.get_msg(
                        streams.STREAM_READY, seq=seq, subject=subject, next=True
                    )
                except NotFoundError:
                    break  # taken meanwhile: what was read is the backlog
                seq = (msg.seq or seq) + 1
                head.append(msg.data or b"")
            out[subject] = (n, head)
        return out

    async def stats(self) -> tuple[list[StreamStat], list[ConsumerStat]]:
        rows: list[StreamStat] = []
        consumers: list[ConsumerStat] = []
        js = self.bus.js
        for name in FM_STREAMS:
            # per-subject counts only for the work-queue streams: one subject per pool /
            # worker there, but one per message nowhere else worth showing
            wq = name in (streams.STREAM_READY, streams.STREAM_ASSIGN)
            info = await js.stream_info(name, subjects_filter=">" if wq else None)
            st = info.state
            rows.append(
                StreamStat(
                    name=name,
                    messages=st.messages or 0,
                    bytes=st.bytes or 0,
                    consumers=st.consumer_count or 0,
                    subjects={k: v for k, v in (st.subjects or {}).items() if v},
                )
            )
            for ci in await js.consumers_info(name):
                consumers.append(
                    ConsumerStat(
                        stream=name,
                        name=ci.name or "",
                        pending=ci.num_pending or 0,
                        ack_pending=ci.num_ack_pending or 0,
                        redelivered=ci.num_redelivered or 0,
                    )
                )
        return rows, consumers

    # --- notices ------------------------------------------------------------------------

    async def broadcast(self, subject: str, data: bytes) -> None:
        await self.bus.nc.publish(subject, data)
        await asyncio.wait_for(self.bus.nc.flush(), 10.0)

    async def listen(self, subject: str, handler: Callable[[bytes], Awaitable[None]]) -> Stop:
        async def cb(msg: Any) -> None:
            await handler(msg.data)

        sub = await self.bus.nc.subscribe(subject, cb=cb)

        async def stop() -> None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()

        return stop

    async def close(self) -> None:
        return None  # the Bus closes the connection
