"""Is a NATS server there? A bounded check before a command or client connects: nats-py
retries an unreachable server forever when reconnects are unlimited (right for a
component that must outlive a restart, wrong for `flowmesh status`)."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

from flowmesh.topics.errors import Unavailable


def addresses(url: str) -> list[tuple[str, int]]:
    """(host, port) of every server in a (comma-separated) NATS URL."""
    out = []
    for part in url.split(","):
        parsed = urlparse(part.strip())
        out.append((parsed.hostname or "127.0.0.1", parsed.port or 4222))
    return out


async def _opens(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def wait_reachable(url: str, give_up_after: float, what: str = "NATS") -> None:
    """Return once a TCP connection to one of the URL's servers opens; retry every 0.25 s
    and raise Unavailable, with the URL and what to do, after `give_up_after` seconds."""
    deadline = time.monotonic() + give_up_after
    tries = 0
    while True:
        tries += 1
        for host, port in addresses(url):
            if await _opens(host, port, min(1.0, max(0.1, deadline - time.monotonic()))):
                return
        if time.monotonic() >= deadline:
            shown = ", ".join(f"{h}:{p}" for h, p in addresses(url))
            raise Unavailable(
                f"no {what} server reachable at {shown} ({tries} tries over "
                f"{give_up_after:.0f}s). Start one with `flowmesh up`, or point --nats / "
                "FLOWMESH_NATS at a running one."
            )
        await asyncio.sleep(0.25)
