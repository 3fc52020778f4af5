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
