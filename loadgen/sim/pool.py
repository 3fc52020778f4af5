"""Emulated workers, the pool they live in, and what they cost.

Billing: a worker is billed (price_per_hour) while it is allocated, from the moment it is
allocated (its cold start included) until it is released; a preempted worker stops being
billed at the kill and is a new allocation when it comes back. Energy: watts_busy while it
runs a batch (a batch lost to preemption counts up to the kill), watts_idle while it is
allocated but not running one (cold start and idle tails included). GPU utilisation:
busy GPU seconds / allocated GPU seconds.

Who allocates: in the shared pool (flowmesh, shared-fifo) a worker is allocated when work
is assigned to it and released after `idle_release_s` without work; the pool holds at
most the workload's `fleet` counts per class. Isolated workflows allocate their own
dedicated workers on arrival and release them on completion.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler.elastic import can_run, kind_pools, size_factor
from flowmesh.engine.scheduler.fleet import DeviceClass, Fleet

if TYPE_CHECKING:
    from flowmesh.engine.scheduler.policy import WorkerState
    from flowmesh.loadgen.sim.readyq import Exec

__all__ = ["Emulator", "SimWorker", "WorkerPool", "can_run", "ensure_resident", "kind_pools"]


class SimWorker:
    __slots__ = (
        "alloc_s",
        "alloc_start",
        "allocated",
        "available",
        "batch",
        "batch_start",
        "batch_token",
        "busy_s",
        "device",
        "exec_s",
        "expected_end",
        "gen",
        "id",
        "idle_since",
        "idle_token",
        "owner",
        "pool",
        "ready_at",
        "resident",
        "serves",
        "state",
    )

    def __init__(self, wid: str, device: DeviceClass, owner: str = "", serves: str = "") -> None:
        self.id = wid
        self.device = device
        self.pool = device.kind  # "gpu" | "cpu"
        self.owner = owner  # isolated: the workflow it is dedicated to
        self.serves = serves  # isolated: the model (or kind) it runs
        self.allocated = False
        self.available = True  # False while a preempted worker's slot is down
        self.alloc_start = 0.0
        self.alloc_s = 0.0
        self.busy_s = 0.0
        self.ready_at = 0.0  # end of the cold start
        self.resident: dict[str, float] = {}  # model -> GB, least recently used first
        self.batch: list[Exec] | None = None
        self.batch_start = 0.0
        self.exec_s = 0.0  # the running batch's pure execution time (no load/fetch)
        self.expected_end = 0.0  # when the scheduler expects the running batch to end
        self.batch_token = 0  # invalidates a DONE event of a lost batch
        self.gen = 0  # allocation generation: invalidates KILL/RELEASE of an old one
        self.idle_token = 0
        self.idle_since = 0.0  # when its last batch ended (shared pool)
        # what the flowmesh policy shows the scheduler of it, reused round after round
        # (refreshed each time it is shown; not one new object per worker per round)
        self.state: WorkerState | None = None

    @property
    def free(self) -> bool:
        return self.allocated and self.available and self.batch is None

    def cost_usd(self) -> float:
        return self.alloc_s * self.device.price_per_hour / 3600.0

    def energy_j(self) -> float:
        idle = max(0.0, self.alloc_s - self.busy_s)
        return self.busy_s * self.device.watts_busy + idle * self.device.watts_idle


class WorkerPool:
    """Every worker of one run; indexes of the idle allocated ones and of the shared
    pool's unallocated ones, kept up to date on every state change."""

    def __init__(self, fleet: Fleet, shared: Mapping[str, int]) -> None:
        self.fleet = fleet
        self.workers: list[SimWorker] = []
        self.free: dict[str, SimWorker] = {}
        self.unalloc: dict[str, dict[str, SimWorker]] = {c: {} for c in shared}
        self.allocated: dict[str, int] = {"gpu": 0, "cpu": 0}
        self.by_class: dict[str, int] = {}  # allocated workers per class
        self.peak_gpus = 0  # most GPUs allocated at once
        for cls, count in shared.items():
            if cls not in fleet.classes:
                raise ValueError(f"workload fleet: unknown device class {cls!r}")
            for i in range(count):
                self.add(SimWorker(f"{cls}-{i}", fleet.classes[cls]))

    def add(self, w: SimWorker) -> None:
        self.workers.append(w)
        self.refresh(w)

    def refresh(self, w: SimWorker) -> None:
        if w.free:
            self.free[w.id] = w
        else:
            self.free.pop(w.id, None)
        if not w.owner:
            if not w.allocated and w.available:
                self.unalloc[w.device.name][w.id] = w
            else:
                self.unalloc[w.device.name].pop(w.id, None)

    def allocate(self, w: SimWorker, now: float, cold_start_s: float) -> None:
        assert not w.allocated and w.available
        w.allocated = True
        w.alloc_start = now
        w.ready_at = now + cold_start_s
        w.gen += 1
        self.allocated[w.pool] += 1
        self.peak_gpus = max(self.peak_gpus, self.allocated["gpu"])
        self.by_class[w.device.name] = self.by_class.get(w.device.name, 0) + 1
        self.refresh(w)

    def release(self, w: SimWorker, now: float) -> None:
        if not w.allocated:
            return
        w.allocated = False
        w.alloc_s += now - w.alloc_start
        w.gen += 1
        w.resident.clear()
        self.allocated[w.pool] -= 1
        self.by_class[w.device.name] -= 1
        self.refresh(w)

    def unallocated(self, pool: str) -> int:
        return sum(len(ws) for c, ws in self.unalloc.items() if self.fleet.classes[c].kind == pool)


def ensure_resident(w: SimWorker, model: str | None, gb: float) -> bool:
    """LRU model residency for the baselines (the Policy does this itself for
    flowmesh): True when the model has to be loaded first."""
    if not model:
        return False
    if model in w.resident:
        w.resident[model] = w.resident.pop(model)
        return False
    used = sum(w.resident.values())
    for m in list(w.resident):
        if used + gb <= w.device.memory_gb:
            break
        used -= w.resident.pop(m)
    w.resident[model] = gb
    return True


class Emulator:
    """The ground truth a batch takes: the fleet profile's latency model for (class,
    kind) times the model-size factor the policy uses (model_gb / ref_model_gb, at least
    the class's min_size_factor), times the class's profile error,
    times seeded lognormal noise (mean 1); plus weight loading and input fetch."""

    def __init__(
        self,
        fleet: Fleet,
        ref_model_gb: Mapping[str, float],
        sigma: float,
        profile_error: Mapping[str, float],
        rng: random.Random,
    ) -> None:
        self.fleet = fleet
        self.ref = ref_model_gb
        self.sigma = sigma
        self.error = profile_error
        self.rng = rng

    def size_factor(self, kind: str, model_gb: float, device: DeviceClass | None = None) -> float:
        """model_gb / ref_model_gb[kind], and on a device no lower than its
        min_size_factor (as the policy's estimate does)."""
        sf = size_factor(self.ref, kind, model_gb)
        return sf if device is None else max(sf, device.min_size_factor)

    def exec_seconds(self, device: DeviceClass, kind: str, n: int, model_gb: float) -> float:
        m = device.latency[kind]
        noise = (
            self.rng.lognormvariate(-self.sigma * self.sigma / 2, self.sigma)
            if self.sigma > 0
            else 1.0
        )
        return (
            m.seconds(n)
            * self.size_factor(kind, model_gb, device)
            * self.error.get(device.name, 1.0)
            * noise
        )

    @staticmethod
    def load_seconds(device: DeviceClass, model_gb: float) -> float:
        return model_gb / max(device.load_gbps, 1e-9)

    @staticmethod
    def fetch_seconds(device: DeviceClass, input_bytes: int) -> float:
        return input_bytes / max(device.net_gbps * 1.25e8, 1.0)
