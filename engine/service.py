"""The engine process: planner and scheduler side by side on one connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import structlog

from flowmesh.engine import metrics
from flowmesh.engine.gateway import Gateway
from flowmesh.engine.planner import Planner
from flowmesh.engine.scheduler import Scheduler
from flowmesh.engine.scheduler.fleet import load_fleet
from flowmesh.engine.scheduler.policy import load_policy_config
from flowmesh.topics import Bus
from flowmesh.topics.cas import open_cas
from flowmesh.topics.creds import redact_url

log = structlog.get_logger("flowmesh.engine")


class Engine:
    def __init__(
        self, planner: Planner, scheduler: Scheduler, bus: Bus, gateway: Gateway | None = None
    ) -> None:
        self.planner = planner
        self.scheduler = scheduler
        self.bus = bus
        self.gateway = gateway  # the tenant-facing API (fm.api.<tenant>.<verb>)

    @classmethod
    async def start(
        cls,
        nats_url: str,
        cas_url: str,
        dead_after_s: float = 5.0,
        fleet_path: Path | None = None,
        policy_path: Path | None = None,
    ) -> Engine:
        fleet = load_fleet(fleet_path) if fleet_path else None
        config = load_policy_config(policy_path) if policy_path else None
        bus = await Bus.connect(nats_url, name="flowmesh-engine")
        cas = await open_cas(cas_url, bus.js)
        planner = Planner(bus, cas)
        scheduler_cls = Scheduler
        if os.environ.get("FLOWMESH_SCHEDULER", "live") == "faust":  # issue 9: on Kafka
            from flowmesh.engine.scheduler.faust_app import FaustScheduler

            scheduler_cls = FaustScheduler
        scheduler = scheduler_cls(bus, dead_after_s=dead_after_s, fleet=fleet, config=config)
        await planner.start()
        await scheduler.start()
        gateway = Gateway(bus, cas)
        await gateway.start()
        # the URL may carry the fabric user's password
        log.info("engine started", nats=redact_url(nats_url), cas=cas_url)
        return cls(planner, scheduler, bus, gateway)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.scheduler.stop()
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
) -> None:
    engine = await Engine.start(nats_url, cas_url, dead_after_s, fleet_path, policy_path)
    metrics.serve(metrics_port)
    web = None
    if console_port:
        from flowmesh.engine.console import start_console

        try:
            web = await start_console(engine.bus, engine.planner.cas, console_port)
        except OSError as exc:  # port taken: the engine runs on without its console
            log.warning("console not started", port=console_port, error=str(exc))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if web is not None:
        await web.stop()
    await engine.stop()
