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
import os
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
from flowmesh.topics.cas import open_cas
from flowmesh.topics.creds import redact_url
from flowmesh.topics.fabric import record_fabric

if TYPE_CHECKING:
    from flowmesh.engine.console.app import ConsoleServer

log = structlog.get_logger("flowmesh.engine")

STOP_TIMEOUT_S = 10.0  # a part that cannot stop cleanly in this long is left to its exit


@dataclass(frozen=True)
class Parts:
    """Which parts of the engine one process runs."""

    planner: bool = True
    scheduler: bool = True
    gateway: bool = True  # the tenant gateway, and the console when it has a port
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
    ) -> Engine:
        bus = await Bus.connect(nats_url, name=f"flowmesh-{parts.name}")
        cas = await open_cas(cas_url, bus.js)
        if parts.planner or parts.gateway:
            # where clients must put datasets and find results (topics/fabric.py)
            await record_fabric(bus, cas_url)
        engine = cls(bus)
        if parts.planner:
            engine.planner = Planner(bus, cas, shard=parts.shard, shards=parts.shards)
            await engine.planner.start()
        if parts.scheduler:
            fleet = load_fleet(fleet_path) if fleet_path else None
            config = load_policy_config(policy_path) if policy_path else None
            scheduler_cls = Scheduler
            if os.environ.get("FLOWMESH_SCHEDULER", "live") == "faust":  # issue 9: on Kafka
                from flowmesh.engine.scheduler.faust_app import FaustScheduler

                scheduler_cls = FaustScheduler
            engine.scheduler = scheduler_cls(
                bus, dead_after_s=dead_after_s, fleet=fleet, config=config
            )
            await engine.scheduler.start()
        if parts.gateway:
            engine.gateway = Gateway(bus, cas)
            await engine.gateway.start()
            if console_port:
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
) -> None:
    """Run `parts` of the engine until SIGINT or SIGTERM."""
    engine = await Engine.start(
        nats_url, cas_url, dead_after_s, fleet_path, policy_path, parts, console_port
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
