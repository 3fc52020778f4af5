"""The seam between FlowMesh's consuming loops and the bus that carries its streams.

Two implementations satisfy it:
- NATS JetStream (the default): a JetStream pull subscription *is* a `Consumer` and its
  messages *are* `Delivery`s (subject, data, ack, nak(delay), in_progress, term), so the
  NATS path runs exactly the calls it always ran, with no wrapper in between.
- Kafka (topics/kafka_bus.py, issue 9): the same five streams as topics, deliveries whose
  ack advances a committed offset.

Which one a process uses is chosen by its environment, so every component started by
`flowmesh up --bus kafka` (engine, workers, clients) agrees without extra plumbing:
$FLOWMESH_BUS (`nats`, the default, or `kafka`) and $FLOWMESH_KAFKA (bootstrap servers,
host:port[,host:port]). Key-value state and the CAS stay on NATS on either bus (see
topics/kafka_bus.py for why).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

BUS_ENV = "FLOWMESH_BUS"
KAFKA_ENV = "FLOWMESH_KAFKA"
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


def bus_from_env() -> str:
    """The bus this process's streams run on ($FLOWMESH_BUS), checked."""
    value = os.environ.get(BUS_ENV, "nats").strip().lower() or "nats"
    if value not in BUSES:
        raise ValueError(f"{BUS_ENV}={value!r}: must be one of {', '.join(BUSES)}")
    return value


def kafka_from_env() -> str | None:
    """Kafka bootstrap servers when this process runs on Kafka, else None."""
    if bus_from_env() != "kafka":
        return None
    return os.environ.get(KAFKA_ENV, "").strip() or DEFAULT_KAFKA
