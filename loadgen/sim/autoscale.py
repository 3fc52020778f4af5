"""The shared pool's autoscaler: how many new workers a round may allocate.

Work first goes to allocated idle workers. Then, per pool (gpu/cpu), the backlog left is
measured in seconds on the pool's fastest class (full batches, the model-size factor
applied), and the pool may grow to ceil(backlog / target_backlog_s) workers: a new
worker is worth its cold start and idle tail only for that much queued work. A backlog
that no allocated worker of its pool can run at all always gets one, and so does one
whose oldest operator has waited longer than `max_wait_s` (when set: a new worker would
have started it by now), at most one such worker per pool per `max_wait_s`. Which class the new
workers are is the policy's choice (flowmesh: the utility function over one candidate per
class; shared-fifo: the first class in the workload's fleet order that can run it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler import elastic

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.simulator import Simulation


def allowance(sim: Simulation, scale_up: str = "backlog") -> dict[str, int]:
    """New workers each pool may allocate this round (engine.scheduler.elastic.grow, as
    the live autoscaler). `scale_up="after-startup"` (flowmesh's option) counts only the
    backlog the allocated workers will not have done by the time a new one is up."""
    q = sim.queue
    backlog = {"gpu": 0.0, "cpu": 0.0}
    starving = {"gpu": False, "cpu": False}
    aged = {"gpu": False, "cpu": False}
    max_wait = sim.settings.max_wait_s
    now = sim.clock.now
    fleet = sim.fleet
    allocated = [fleet.classes[c] for c, n in sim.pool.by_class.items() if n > 0]
    for bk, size in q.sizes.items():
        it = q.head(bk).item
        pool = sim.kind_pool[it.kind]
        sf = sim.emu.size_factor(it.kind, it.model_gb)
        backlog[pool] += elastic.backlog_seconds(sim.fastest[it.kind], size, sf)
        if max_wait is not None and now - it.ready_at > max_wait:
            aged[pool] = now - sim.aged_scale_at.get(pool, -math.inf) >= max_wait
        if not starving[pool] and not any(
            d.kind == pool and elastic.can_run(d, it.kind, it.model_gb) for d in allocated
        ):
            starving[pool] = True
    out: dict[str, int] = {}
    for pool, secs in backlog.items():
        k, by_age = elastic.grow(
            secs,
            sim.pool.allocated[pool],
            sim.pool.unallocated(pool),
            sim.settings.cold_start_s,
            sim.settings.target_backlog_s,
            scale_up,
            starving[pool],
            aged[pool],
        )
        if by_age:
            sim.aged_scale_at[pool] = now
        out[pool] = k
    return out
