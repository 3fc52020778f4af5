"""The scheduler as a faust-streaming agent on Kafka (`flowmesh engine --bus kafka
--scheduler faust`, issue 9).

A faust agent consumes every pool's ready topic and hands each event to the same
`Scheduler` the NATS path runs (engine/scheduler/live.py): its pool, the pure `Policy`
that picks batch and worker, assignment publishing, worker liveness and reclaim are one
code; only where ready operators come from differs (`_ready_source`). An event is acked
when its operator is assigned (or found a duplicate, or dead-lettered); faust commits
acked offsets in order, so a scheduler killed with operators in its pool reads them
again on restart, like unacked messages on NATS.

The faust app's id is the live scheduler's consumer group (`scheduler`): switching
between `--scheduler live` and `--scheduler faust` resumes from the same offsets. Faust
joins that group (tansu takes a few seconds to settle one), so the app starts before the
engine reports itself up.

faust-streaming is its own extra (`flowmesh[faust]`): it pins click<8.4, which the llm
extra's huggingface-hub does not allow, so it lives where the engine runs without LLMs.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from flowmesh.engine.scheduler.live import Scheduler
from flowmesh.topics import streams
from flowmesh.topics.bus.transport import Consumer

log = structlog.get_logger("flowmesh.scheduler.faust")


class AgentDelivery:
    """A faust event as a `Delivery`."""

    def __init__(self, event: Any, feed: AgentFeed) -> None:
        self._event = event
        self._feed = feed
        self.subject: str = event.message.topic
        self.data: bytes = event.value or b""

    async def ack(self) -> None:
        self._event.ack()

    async def term(self) -> None:
        self._event.ack()

    async def nak(self, delay: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(delay or 0.0, self._feed.queue.put_nowait, self)

    async def in_progress(self) -> None:
        return None  # no ack deadline: the partition is ours while we are in the group


class AgentFeed:
    """The `Consumer` the scheduler fetches from; the agent fills it. Bounded, so a full
    pool stops the agent, and faust stops fetching, instead of growing without end."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[AgentDelivery] = asyncio.Queue(maxsize)

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[AgentDelivery]:
        try:
            first = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise TimeoutError from None  # as a JetStream fetch that got nothing
        out = [first]
        while len(out) < batch and not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def unsubscribe(self) -> None:
        return None


def make_app(bootstrap: str, topics: list[str], feed: AgentFeed) -> Any:
    """The faust app: one agent over the ready topics, feeding `feed`."""
    import faust  # the faust extra, only for --scheduler faust

    app = faust.App(
        streams.SCHEDULER,
        broker=[f"kafka://{server}" for server in bootstrap.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        topic_partitions=1,
        # the topics exist (KafkaStreams made them with the one partition producers use)
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        # a restarted scheduler should get the ready topics back soon
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        stream_wait_empty=False,
    )
    topic = app.topic(*topics, value_serializer="raw", key_serializer="raw")

    async def ready(stream: Any) -> None:
        # noack: an event is settled by the scheduler when its operator is assigned
        async for event in stream.noack().events():
            await feed.queue.put(AgentDelivery(event, feed))

    app.agent(topic, name="ready")(ready)
    return app


class FaustScheduler(Scheduler):
    """`Scheduler` with its ready pool fed by a faust agent."""

    app: Any = None

    async def _ready_source(self) -> Consumer:
        from flowmesh.topics.bus.kafka import KafkaStreams

        kafka = self.bus.transport
        if not isinstance(kafka, KafkaStreams):
            raise RuntimeError("the faust scheduler runs on Kafka: start it with --bus kafka")
        topics = kafka.ready_topics()
        for topic in topics:
            await kafka.ensure_topic(topic)
        feed = AgentFeed(maxsize=self.pool_limit)
        self.app = make_app(kafka.bootstrap, topics, feed)
        await self.app.start()
        log.info("faust scheduler agent started", topics=topics, group=streams.SCHEDULER)
        return feed

    async def stop(self) -> None:
        await super().stop()
        if self.app is not None:
            with contextlib.suppress(Exception):
                await self.app.stop()
