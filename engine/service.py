"""The engine's processes: planner shards, the scheduler, and the gateway with the console.

Each part runs alone in a process of its own (`flowmesh planner --shard I --shards N`,
`flowmesh scheduler`, `flowmesh gateway`), so a slow part never stalls another's event
loop and one that dies is restarted alone; `flowmesh engine` runs all three in one
process (one planner shard of one), as before. The parts share nothing but the bus: every
one of them can be killed and restarted at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from flowmesh.engine import metrics
from flowmesh.engine.gateway import Gateway
from flowmesh.engine.planner import Planner
from flowmesh.engine.scheduler import Scheduler
from flowmesh.engine.scheduler.fleet import load_fleet
from flowmesh.engine.scheduler.policy import load_policy_config
from flowmesh.engine.shards import check_shard
from flowmesh.topics import Bus
from flowmesh.topics.config.creds import redact_url
from flowmesh.topics.parent import terminate_when_parent_gone
from flowmesh.topics.store.cas import open_cas
from flowmesh.topics.store.fabric import record_fabric

if TYPE_CHECKING:
    from flowmesh.engine.console.app import ConsoleServer
    from flowmesh.topics.bus.kafka_kv import KVOwner

log = structlog.get_logger("flowmesh.engine")

STOP_TIMEOUT_S = 10.0  # a part that cannot stop cleanly in this long is left to its exit


@dataclass(frozen=True)
class Parts:
    """Which parts of the engine one process runs."""

    planner: bool = True
    scheduler: bool = True
    gateway: bool = True  # the tenant gateway (NATS only), and the console when it has a port
    shard: int = 0  # with planner: this process plans shard `shard` of `shards`
    shards: int = 1

    def __post_init__(self) -> None:
        check_shard(self.shard, self.shards)

    @property
    def name(self) -> str:
        if self.planner and self.scheduler and self.gateway:
            return "engine"
        if self.planner:
            return f"planner-{self.shard}"
        return "scheduler" if self.scheduler else "gateway"


ALL = Parts()


def planner_part(shard: int, shards: int) -> Parts:
    return Parts(scheduler=False, gateway=False, shard=shard, shards=shards)


SCHEDULER = Parts(planner=False, gateway=False)
GATEWAY = Parts(planner=False, scheduler=False)


class Engine:
    def __init__(
        self,
        bus: Bus,
        planner: Planner | None = None,
        scheduler: Scheduler | None = None,
        gateway: Gateway | None = None,
    ) -> None:
        self.bus = bus
        self.planner = planner
        self.scheduler = scheduler
        self.gateway = gateway  # the tenant-facing API (fm.api.<tenant>.<verb>)
        self.console: ConsoleServer | None = None
        self.kv_owner: KVOwner | None = None  # Kafka-only: the one writer of every bucket

    @classmethod
    async def start(
        cls,
        nats_url: str,
        cas_url: str,
        dead_after_s: float = 5.0,
        fleet_path: Path | None = None,
        policy_path: Path | None = None,
        parts: Parts = ALL,
        console_port: int = 0,
        kafka: str | None = None,
        scheduler: str = "live",
        max_attempts: int | None = None,
        max_reclaims: int | None = None,
        kv: str | None = None,
    ) -> Engine:
        """`kafka`: the streams' Kafka servers ("" for NATS; None: the environment
        says); `scheduler`: live or faust; the max_* (None: the environment or the
        default) travel with every operator the planner makes ready."""
        bus = await Bus.connect(nats_url, name=f"flowmesh-{parts.name}", kafka=kafka, kv=kv)
        engine = cls(bus)
        if bus.kafka_kv is not None and parts.scheduler:
            # KV on Kafka: the process with the (one) scheduler applies every write, so
            # it starts before anything here asks for KV (topics/bus/kafka_kv.py)
            from flowmesh.topics.bus.kafka import KafkaStreams
            from flowmesh.topics.bus.kafka_kv import ALL_BUCKETS, KVOwner

            assert isinstance(bus.transport, KafkaStreams)
            engine.kv_owner = KVOwner(bus.transport, ALL_BUCKETS)
            await engine.kv_owner.start()
        cas = await open_cas(cas_url, bus.js)
        if parts.planner or parts.gateway:
            # where clients must put datasets and find results (topics/store/fabric.py)
            await record_fabric(bus, cas_url)
        if parts.planner:
            engine.planner = Planner(
                bus,
                cas,
                shard=parts.shard,
                shards=parts.shards,
                max_attempts=max_attempts,
                max_reclaims=max_reclaims,
            )
            await engine.planner.start()
        if parts.scheduler:
            fleet = load_fleet(fleet_path) if fleet_path else None
            config = load_policy_config(policy_path) if policy_path else None
            scheduler_cls = Scheduler
            if scheduler == "faust":  # issue 9: on Kafka
                from flowmesh.engine.scheduler.faust_app import FaustScheduler

                scheduler_cls = FaustScheduler
            engine.scheduler = scheduler_cls(
                bus, dead_after_s=dead_after_s, fleet=fleet, config=config
            )
            await engine.scheduler.start()
        if parts.gateway and not bus.has_nats:
            # the tenant API is NATS request/reply (fm.api.<tenant>.<verb>), and the
            # tenants' credentials are the nats-server's: neither exists on Kafka-only
            log.warning(
                "tenant gateway not started: it is NATS request/reply, and this bus is "
                "Kafka-only (FLOWMESH_KV=kafka); tenants submit with the client on Kafka"
            )
        elif parts.gateway:
            engine.gateway = Gateway(bus, cas)
            await engine.gateway.start()
        if parts.gateway and console_port:
            # the console reads only the bus's streams and KV (engine/monitor.py), so it
            # runs on either bus; on Kafka-only it admits the operator alone (access.py)
            from flowmesh.engine.console import start_console

            try:
                engine.console = await start_console(bus, cas, console_port)
            except OSError as exc:  # port taken: the gateway runs on without a console
                log.warning("console not started", port=console_port, error=str(exc))
        # the URL may carry the fabric user's password
        log.info(
            "engine started",
            part=parts.name,
            shard=f"{parts.shard}/{parts.shards}" if parts.planner else None,
            nats=redact_url(nats_url),
            cas=cas_url,
            bus=bus.transport.name,
        )
        return engine

    async def stop(self) -> None:
        if self.console is not None:
            await self.console.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.planner is not None:
            await self.planner.stop()
        if self.kv_owner is not None:
            await self.kv_owner.stop()
        await self.bus.close()


async def serve(
    nats_url: str,
    cas_url: str,
    dead_after_s: float = 5.0,
    fleet_path: Path | None = None,
    policy_path: Path | None = None,
    metrics_port: int = 0,
    console_port: int = 0,
    parts: Parts = ALL,
    kafka: str | None = None,
    scheduler: str = "live",
    max_attempts: int | None = None,
    max_reclaims: int | None = None,
    kv: str | None = None,
) -> None:
    """Run `parts` of the engine until SIGINT or SIGTERM."""
    orphaned = terminate_when_parent_gone()  # from the start: connecting may wait long
    engine = await Engine.start(
        nats_url,
        cas_url,
        dead_after_s,
        fleet_path,
        policy_path,
        parts,
        console_port,
        kafka=kafka,
        scheduler=scheduler,
        max_attempts=max_attempts,
        max_reclaims=max_reclaims,
        kv=kv,
    )
    metrics.serve(metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    try:
        # bounded: with the bus gone a last status write would wait for it forever;
        # what is not written is rebuilt by the next planner from the streams
        await asyncio.wait_for(engine.stop(), STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("engine did not stop cleanly", part=parts.name, timeout_s=STOP_TIMEOUT_S)
    orphaned.cancel()
