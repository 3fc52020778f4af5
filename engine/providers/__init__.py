"""Where the autoscaler's workers come from: the `Provider` seam and its implementations
(local processes, a Kubernetes Deployment per device class)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Provider(Protocol):
    """Adds and retires workers of a device class.

    `replicas` is what the provider runs or is starting for the class (a worker that has
    not registered yet counts, so a slow start is not answered with more starts).
    `scale` asks for `replicas` workers; when that is fewer than now, `retire` names idle
    workers to stop first. A provider that can choose (local processes) stops exactly
    those and never one outside the list; one that cannot (a Deployment) lowers the count
    and lets the platform pick. Either way a worker is stopped gracefully (SIGTERM: it
    finishes the batch in hand, and what it still holds is reclaimed and replayed)."""

    async def replicas(self, device_class: str) -> int: ...

    async def scale(self, device_class: str, replicas: int, retire: Sequence[str] = ()) -> None: ...


__all__ = ["Provider"]
