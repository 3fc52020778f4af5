"""The seam between FlowMesh's components and the bus that carries its streams.

Every consuming loop, every publish of a stream message and every reading of the streams'
state (lag, backlog, what a worker holds) goes through a `Transport`; no component
outside topics/bus/ asks which bus it runs on. Two implementations:
- NATS JetStream (topics/bus/jetstream.py, the default): the five streams with their
  durable pull consumers; a JetStream pull subscription *is* a `Consumer` and its
  messages *are* `Delivery`s (subject, data, ack, nak(delay), in_progress, term).
- Kafka (topics/bus/kafka.py): the same subjects as topics, deliveries whose ack
  advances a committed offset, a dead worker's partition taken back by the scheduler.

Which one a process uses is chosen by its environment, so every component started by
`flowmesh up --bus kafka` (engine, workers, clients) agrees without extra plumbing:
$FLOWMESH_BUS (`nats`, the default, or `kafka`) and $FLOWMESH_KAFKA (bootstrap servers,
host:port[,host:port]). Key-value state stays on NATS KV unless $FLOWMESH_KV=kafka too
(topics/bus/kafka_kv.py: a Kafka-only process, no NATS connection at all).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

BUS_ENV = "FLOWMESH_BUS"
KAFKA_ENV = "FLOWMESH_KAFKA"
# where KV buckets live on Kafka: `nats` (the default) or `kafka` (topics/bus/kafka_kv.py,
# only with FLOWMESH_BUS=kafka)
KV_ENV = "FLOWMESH_KV"
BUSES = ("nats", "kafka")
DEFAULT_KAFKA = "127.0.0.1:9092"


class Delivery(Protocol):
    """One message handed to a consumer, to be settled exactly one way."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    async def ack(self) -> None:
        """Done with it: never delivered to this consumer's group again."""

    async def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again (after `delay` seconds)."""

    async def in_progress(self) -> None:
        """Still working on it: do not give it to anyone else yet."""

    async def term(self) -> None:
        """Never deliver it again (it was dead-lettered)."""


class Consumer(Protocol):
    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> Sequence[Delivery]:
        """Up to `batch` deliveries; raises TimeoutError when none came in `timeout`."""
        ...

    async def unsubscribe(self) -> None:
        """Stop consuming (what is unsettled is delivered again later)."""


@dataclass(frozen=True)
class Record:
    """A message read back from a stream that keeps them (no ack): its sequence (1 and
    up, in stream order), subject, payload and when the bus stored it (Unix seconds)."""

    seq: int
    subject: str
    data: bytes
    at: float


class Replay(Protocol):
    """A stream read from a sequence on, in order, in no consumer group."""

    @property
    def stale(self) -> bool:
        """True once it can no longer be trusted to deliver everything (a NATS
        reconnect lost the server-side consumer): make a new one from where you are."""
        ...

    async def fetch(self, batch: int, timeout: float) -> Sequence[Record]:
        """Up to `batch` records; raises TimeoutError when none came in `timeout`."""
        ...

    async def unsubscribe(self) -> None: ...


@dataclass
class StreamStat:
    """One stream (on Kafka: the topics of one role) as the monitor shows it.
    `messages`: on FM_READY / FM_ASSIGN the ones not yet acked (work queues), elsewhere
    the ones kept."""

    name: str
    messages: int
    bytes: int
    consumers: int
    subjects: dict[str, int] = field(default_factory=dict)  # FM_READY / FM_ASSIGN only


@dataclass
class ConsumerStat:
    stream: str
    name: str
    pending: int  # not yet delivered: the lag
    ack_pending: int  # delivered, not acked yet
    redelivered: int


Handler = Callable[[str, bytes], Awaitable[None]]
Stop = Callable[[], Awaitable[None]]


class Transport(Protocol):
    """What the fabric asks of its bus. Payloads are encoded bytes (topics/codec.py)."""

    name: str  # "nats" or "kafka"

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        """Store one message and wait until it is stored (retried through an outage; a
        repeat with the same msg_id is dropped where the bus can)."""

    async def publish_many(
        self, items: list[tuple[str, bytes, str | None]], retry_s: float
    ) -> None:
        """Store several, pipelined; return once all are stored."""

    async def replay(self, subject: str, after: int = 0, since: float | None = None) -> Replay:
        """Every message of `subject`'s stream with a sequence above `after` (0: all),
        for a planner re-reading the submissions; with `since`, those stored from that
        time on (the lineage finding a workflow's spec)."""
        ...

    async def ready_consumer(self) -> Consumer:
        """The scheduler's: every pool's ready operators, one group for all schedulers."""
        ...

    async def assignment_consumer(self, worker: str, slots: int) -> Consumer:
        """A worker's: its own assignments, acked once its results are committed."""
        ...

    async def assignment_consumer_gone(self, worker: str) -> bool:
        """Whether the scheduler took `worker` for dead and removed its consumer (it
        must make a new one, and rejoin)."""
        ...

    async def done_consumer(self, name: str) -> Consumer:
        """A planner shard's: every completion, in its own durable group `name`."""
        ...

    async def take_back(self, worker: str, handle: Handler) -> int:
        """Every assignment `worker` holds unacked, to `handle(subject, data)` in order,
        and gone from the worker afterwards; returns how many. A crash in between hands
        them out again on the next reclaim (duplicates: commits are compare-and-set)."""
        ...

    async def assigned_counts(self) -> dict[str, int]:
        """Assignment subject -> batches its worker has not acked yet."""
        ...

    async def ready_backlog(self, sample: int) -> dict[str, tuple[int, list[bytes]]]:
        """Ready subject -> (chunks not yet acked by the scheduler, up to `sample` of the
        oldest of them)."""
        ...

    async def stats(self) -> tuple[list[StreamStat], list[ConsumerStat]]:
        """The five streams and their consumers, for `flowmesh top` and the console."""
        ...

    async def broadcast(self, subject: str, data: bytes) -> None:
        """A notice to every listener running now (not stored for later ones)."""

    async def listen(self, subject: str, handler: Callable[[bytes], Awaitable[None]]) -> Stop:
        """`handler(data)` for every broadcast on `subject` from now on; returns stop()."""
        ...

    async def close(self) -> None: ...


def bus_from_env() -> str:
    """The bus this process's streams run on ($FLOWMESH_BUS), checked."""
    value = os.environ.get(BUS_ENV, "nats").strip().lower() or "nats"
    if value not in BUSES:
        raise ValueError(f"{BUS_ENV}={value!r}: must be one of {', '.join(BUSES)}")
    return value


def kv_from_env() -> str:
    """Where this process's KV buckets live ($FLOWMESH_KV), checked."""
    value = os.environ.get(KV_ENV, "nats").strip().lower() or "nats"
    if value not in BUSES:
        raise ValueError(f"{KV_ENV}={value!r}: must be one of {', '.join(BUSES)}")
    return value


def kafka_from_env() -> str | None:
    """Kafka bootstrap servers when this process runs on Kafka, else None."""
    if bus_from_env() != "kafka":
        return None
    return os.environ.get(KAFKA_ENV, "").strip() or DEFAULT_KAFKA
