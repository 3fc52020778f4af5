"""Workers as local processes of a `LocalFabric` (what `flowmesh up --autoscale` uses)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from flowmesh.engine.local import LocalFabric

log = structlog.get_logger("flowmesh.autoscaler.local")


@dataclass
class _Proc:
    worker: str
    device_class: str
    proc: subprocess.Popen[bytes]
    retiring: bool = False


@dataclass
class LocalProcessProvider:
    """Starts `flowmesh-worker` processes through the fabric (same logs, same data dir,
    stopped with it) and retires them with SIGTERM, the worker's graceful stop.

    `classes` maps each device class to the worker flags that make one
    (e.g. ["--device-class", "cpu", "--price-per-hour", "0.05"])."""

    fabric: LocalFabric
    classes: Mapping[str, Sequence[str]]
    _procs: dict[str, _Proc] = field(default_factory=dict)

    def _reap(self) -> None:
        for wid, p in list(self._procs.items()):
            code = p.proc.poll()
            if code is not None:
                del self._procs[wid]
                if not p.retiring:
                    # died on its own: the scheduler reclaims its work; we only stop
                    # counting it, so the next round starts a replacement if needed
                    log.warning("worker exited", worker=wid, code=code)

    def running(self, device_class: str | None = None) -> list[str]:
        """Workers of the class (all if None) that run and are not being retired."""
        self._reap()
        return [
            wid
            for wid, p in self._procs.items()
            if not p.retiring and (device_class is None or p.device_class == device_class)
        ]

    def alive(self) -> list[str]:
        """Every worker process still running, retiring ones included."""
        self._reap()
        return list(self._procs)

    async def replicas(self, device_class: str) -> int:
        return len(self.running(device_class))

    async def scale(self, device_class: str, replicas: int, retire: Sequence[str] = ()) -> None:
        if device_class not in self.classes:
            raise ValueError(f"no worker flags for device class {device_class!r}")
        current = self.running(device_class)
        for _ in range(max(0, replicas - len(current))):
            proc = self.fabric.start_worker(list(self.classes[device_class]))
            wid = self.fabric.worker_ids[-1]
            self._procs[wid] = _Proc(wid, device_class, proc)
            log.info("worker started", worker=wid, device_class=device_class)
        excess = len(current) - replicas
        for wid in [w for w in retire if w in current][: max(0, excess)]:
            p = self._procs[wid]
            p.retiring = True
            p.proc.send_signal(signal.SIGTERM)
            log.info("worker retiring", worker=wid, device_class=device_class)


class LocalAutoscaler:
    """`flowmesh up --autoscale`: an Autoscaler over local worker processes, in a thread
    of its own beside the CLI's foreground loop (which only watches the engine)."""

    def __init__(
        self,
        fabric: LocalFabric,
        min_workers: int,
        max_workers: int,
        idle_grace_s: float,
        device_class: str = "cpu",
        fleet_path: str | None = None,
    ) -> None:
        import threading

        from flowmesh.engine.autoscaler import AutoscalerConfig, ClassPolicy, class_from_fleet
        from flowmesh.engine.scheduler.fleet import load_fleet

        fleet = load_fleet(fleet_path) if fleet_path else None
        policy = (
            class_from_fleet(fleet, device_class, min_workers, max_workers)
            if fleet is not None and device_class in fleet.classes
            else ClassPolicy(device_class, min_workers=min_workers, max_workers=max_workers)
        )
        self.config = AutoscalerConfig(classes=(policy,), idle_grace_s=idle_grace_s)
        self.fleet = fleet
        self.provider = LocalProcessProvider(
            fabric, {device_class: ["--device-class", device_class]}
        )
        self.fabric = fabric
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="autoscaler", daemon=True)

    def start(self) -> LocalAutoscaler:
        self._thread.start()
        return self

    def _main(self) -> None:
        import asyncio

        asyncio.run(self._run())

    async def _run(self) -> None:
        import asyncio

        from flowmesh.engine.autoscaler import Autoscaler
        from flowmesh.topics import Bus

        bus = await Bus.connect(
            self.fabric.nats_url,
            name="flowmesh-autoscaler",
            kafka=self.fabric.kafka_servers,
            kv=self.fabric.kv,
        )
        scaler = Autoscaler(bus, self.provider, self.config, fleet=self.fleet)
        stop = asyncio.Event()

        async def watch() -> None:
            while not self._stop.is_set():
                await asyncio.sleep(0.2)
            stop.set()

        watcher = asyncio.create_task(watch())
        try:
            await scaler.run(stop)
        finally:
            watcher.cancel()
            await bus.close()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
