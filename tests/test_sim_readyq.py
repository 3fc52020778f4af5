"""The simulator's ready queue hands the policy the groups it would build by walking the
queue, though it keeps them between rounds and rebuilds them from a slice."""

from __future__ import annotations

import random
from dataclasses import astuple

from flowmesh.engine.scheduler.groups import ReadyGroup, ReadyItem
from flowmesh.loadgen.sim.readyq import READY, Exec, ReadyQueue


def walked(q: ReadyQueue, bk: str, limit: int) -> ReadyGroup:
    """The group as the simulator built it every round before: the first `limit` ready
    operators in queue order, sorted oldest first (stable)."""
    execs = q.first(bk, min(q.sizes[bk], limit))
    return ReadyGroup.of(sorted((e.item for e in execs), key=lambda it: it.ready_at))


def test_kept_groups_are_the_walked_groups_through_pushes_takes_and_replays() -> None:
    rng = random.Random(5)
    q = ReadyQueue()
    ready: list[Exec] = []
    taken: list[Exec] = []
    now = 0.0
    for step in range(4000):
        r = rng.random()
        if r < 0.45 or not ready:
            now += rng.choice((0.0, 0.5))  # ties in ready_at too
            it = ReadyItem(
                f"op{step}", f"bk{rng.randrange(3)}", "generate", "generate@1", "m", 16.0,
                1024, f"t{rng.randrange(4)}", "wf", now,
            )  # fmt: skip
            e = Exec(it, [])
            q.push(e)
            ready.append(e)
        elif r < 0.85:
            # a batch: the group's oldest, or (a tenant's split group) any of them
            bk = rng.choice(sorted(q.sizes))
            g = q.group(bk, rng.choice((2, 5, 1000)))[0]
            n = min(3, len(g.items))
            picked = g.items[:n] if rng.random() < 0.6 else rng.sample(g.items, n)
            execs = [q.group(bk, 1000)[1][it.key] for it in picked]
            for e in execs:
                q.take(e)
                ready.remove(e)
                taken.append(e)
        elif taken:
            # a preempted batch: its operators go back to the front of their queue
            e = taken.pop(rng.randrange(len(taken)))
            q.push(e, front=True)
            ready.append(e)
        for bk in sorted(q.sizes):
            for limit in (1, 3, 7, 1000):
                got, execs = q.group(bk, limit)
                want = walked(q, bk, limit)
                assert astuple(got) == astuple(want)
                assert list(got.tenants.items()) == list(want.tenants.items())  # same order
                assert all(execs[it.key].item is it for it in got.items)
    assert all(e.state == READY for e in ready)
    assert q.total == len(ready)
