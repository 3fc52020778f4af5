"""Right-sizing an elastic pool: how many workers to add, and which idle ones to keep.

Both are break-even questions between idle $ and cold-start $ (a new worker is billed
through `startup_s` before it runs anything), answered from what the control plane
knows: the ready backlog, the work accepted workflows still have to do (the planner
holds their DAGs), and the workers it has. Pure functions over numbers, so the
simulator and a live autoscaler make the same choice.

- `scale_up`: a new worker only starts running after `startup_s`; by then the workers
  already allocated have worked `startup_s` each on the backlog. Only what is left then
  is spread at `target_backlog_s` per worker, so a worker is added for work that will
  still be waiting for it, not for work a warm one finishes during its cold start.
- `idle_to_keep`: an idle worker is worth keeping (rather than releasing and paying a
  cold start later) only while the accepted workflows' remaining work for its pool is
  more than the busy workers get through within the break-even horizon (`startup_s`:
  holding an idle worker that long costs what a new cold start costs).
"""

from __future__ import annotations

import math


def scale_up(
    backlog_s: float,
    allocated: int,
    startup_s: float,
    target_backlog_s: float,
) -> int:
    """Workers to add to a pool with `allocated` workers and `backlog_s` seconds of
    ready work (on its fastest class), so that each worker has at most about
    `target_backlog_s` of it once the new ones are up; 0 when the allocated ones will
    have worked it down by then."""
    if backlog_s <= 0 or target_backlog_s <= 0:
        return 0
    left = backlog_s - max(0, allocated) * max(0.0, startup_s)
    if left <= 0:
        return 0
    return max(0, math.ceil(left / target_backlog_s - 1e-9) - max(0, allocated))


def idle_to_keep(pending_s: float, busy: int, idle: int, horizon_s: float) -> int:
    """How many of a pool's `idle` workers to keep: the pool's remaining work
    (`pending_s`: ready or not yet ready, of accepted workflows, in seconds on its
    fastest class) beyond what its `busy` workers do within `horizon_s`, in workers of
    `horizon_s` each. 0 when the busy ones can take it all (or nothing is left)."""
    if idle <= 0 or pending_s <= 0:
        return 0
    horizon_s = max(horizon_s, 1e-9)
    extra = pending_s - max(0, busy) * horizon_s
    if extra <= 0:
        return 0
    return min(idle, math.ceil(extra / horizon_s - 1e-9))
