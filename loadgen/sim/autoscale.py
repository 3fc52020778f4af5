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

from flowmesh.engine.scheduler import rightsize
from flowmesh.loadgen.sim.pool import can_run

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.simulator import Simulation


def allowance(sim: Simulation, scale_up: str = "backlog") -> dict[str, int]:
    """New workers each pool may allocate this round. `scale_up="after-startup"`
    (flowmesh's option, engine.scheduler.rightsize.scale_up) counts only the backlog the
    allocated workers will not have done by the time a new one is up."""
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
        m = sim.fastest[it.kind]
        sf = sim.emu.size_factor(it.kind, it.model_gb)
        batches = math.ceil(size / max(m.max_batch, 1))
        backlog[pool] += (batches * m.fixed_s + size * m.per_item_s) * sf
        if max_wait is not None and now - it.ready_at > max_wait:
            aged[pool] = now - sim.aged_scale_at.get(pool, -math.inf) >= max_wait
        if not starving[pool] and not any(
            d.kind == pool and can_run(d, it.kind, it.model_gb) for d in allocated
        ):
            starving[pool] = True
    out: dict[str, int] = {}
    target = max(sim.settings.target_backlog_s, 1e-9)
    for pool, secs in backlog.items():
        if secs <= 0:
            out[pool] = 0
            continue
        if scale_up == "after-startup":
            k = rightsize.scale_up(
                secs, sim.pool.allocated[pool], sim.settings.cold_start_s, target
            )
        else:
            k = math.ceil(secs / target) - sim.pool.allocated[pool]
        if starving[pool]:
            k = max(k, 1)
        elif aged[pool] and k <= 0:
            k = 1
            sim.aged_scale_at[pool] = now
        out[pool] = max(0, min(k, sim.pool.unallocated(pool)))
    return out
