"""CPU time of processes, read from the kernel (/proc/<pid>/stat: user + system time of
the process and of its waited-for children), so a benchmark counts the CPU its workers
used, not the wall time they were alive on a shared box."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its reaped children; nan when the kernel
    does not say (no /proc, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return math.nan
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


class CpuMeter:
    """CPU seconds of a changing set of processes over a span: each is sampled (by
    `sample`, called often) and counted from its first sample in the span, or from 0
    when it started inside the span (its start-up and model load are counted: a worker
    started on demand pays its cold start). A process that exits is counted up to its
    last sample (less than one sampling interval of CPU can go uncounted, never more)."""

    def __init__(self) -> None:
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def start(self, pids: Iterable[int]) -> None:
        for p in pids:
            v = cpu_seconds(p)
            if not math.isnan(v):
                self.base[p] = self.last[p] = v

    def sample(self, pids: Iterable[int]) -> int:
        """Sample every pid; returns how many are alive."""
        alive = 0
        for p in pids:
            v = cpu_seconds(p)
            if math.isnan(v):
                continue
            alive += 1
            self.base.setdefault(p, 0.0)
            self.last[p] = v
        return alive

    def total(self) -> float:
        return sum(self.last[p] - self.base.get(p, 0.0) for p in self.last)
