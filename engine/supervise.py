"""Keep things alive: a component's long-running loops (`guarded`) and a local fabric's
processes (`Supervisor`)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("flowmesh.supervise")


async def guarded(
    component: str,
    name: str,
    loop: Callable[[], Awaitable[None]],
    stopping: asyncio.Event,
    backoff_s: float = 0.5,
) -> None:
    """Run `loop` until it returns or `stopping` is set, restarting it after any error:
    a shared component never dies of one bad event or a lost connection."""
    log = structlog.get_logger(f"flowmesh.{component}")
    while not stopping.is_set():
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loop failed; restarting it", component=component, loop=name)
            await asyncio.sleep(backoff_s)


@dataclass
class Child:
    """A process the supervisor keeps running."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes]
    started_at: float
    quick_exits: int = 0  # exits in a row, each within `stable_s` of its start
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Restarts the processes it watches when they exit, with exponential backoff.

    A child that exits is started again after base_s, then 2x, 4x... up to max_s while
    it keeps exiting within stable_s of its start (a crash loop must not spin the CPU),
    and after base_s again once it had run for stable_s. `check()` does the work; the
    caller decides how often to call it (`flowmesh up` twice a second)."""

    base_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    children: dict[str, Child] = field(default_factory=dict)

    def watch(self, name: str, spawn: Callable[[], subprocess.Popen[bytes]]) -> Child:
        """Start `spawn()` now and restart it whenever it exits."""
        child = Child(name, spawn, spawn(), self.clock())
        self.children[name] = child
        return child

    def adopt(
        self, name: str, proc: subprocess.Popen[bytes], spawn: Callable[[], subprocess.Popen[bytes]]
    ) -> Child:
        """Watch a process started elsewhere; `spawn()` starts its replacement."""
        child = Child(name, spawn, proc, self.clock())
        self.children[name] = child
        return child

    def forget(self, name: str) -> None:
        self.children.pop(name, None)

    def delay_s(self, child: Child) -> float:
        return float(min(self.max_s, self.base_s * 2 ** max(0, child.quick_exits - 1)))

    def check(self) -> list[str]:
        """Note the children that exited, restart those whose backoff is over; the names
        restarted in this call."""
        now = self.clock()
        restarted: list[str] = []
        for child in self.children.values():
            code = child.proc.poll()
            if code is None:
                continue
            if child.restart_at is None:
                ran = now - child.started_at
                child.quick_exits = child.quick_exits + 1 if ran < self.stable_s else 1
                child.restart_at = now + self.delay_s(child)
                log.warning(
                    "process exited; restarting it",
                    process=child.name,
                    code=code,
                    ran_s=round(ran, 1),
                    in_s=round(child.restart_at - now, 2),
                )
            if now >= child.restart_at:
                try:
                    child.proc = child.spawn()
                except OSError as exc:  # e.g. out of processes: try again later
                    log.error("restart failed", process=child.name, error=str(exc))
                    child.quick_exits += 1
                    child.restart_at = now + self.delay_s(child)
                    continue
                child.started_at = now
                child.restart_at = None
                child.restarts += 1
                restarted.append(child.name)
                log.info("process restarted", process=child.name, restarts=child.restarts)
        return restarted
