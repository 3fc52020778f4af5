"""Keep a component's long-running loops alive."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog


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
