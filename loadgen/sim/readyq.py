"""Ready operators waiting for a worker, grouped by batch key, oldest first.

An `Exec` is one unit of execution: under content dedup one per distinct key in flight
(every workflow operator that asked for that key waits on it), otherwise one per
workflow operator. Taking an exec out of a group is O(1) (lazy deletion: a stale entry
is skipped when the group is read), so a round may pick any of a group's members.

A batch key's group as the policy reads it (`group`: its first n operators, oldest
first) is kept until its first n may have changed, so a round rebuilds only the groups
that operators joined or left since the last one, and a rebuild slices the key's
operators, kept beside the queue, instead of walking the queue in Python (rebuilding
every group from the queue every round was a third of a 200-GPU bench-sim in
cProfile).
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler.policy import ReadyGroup, ReadyItem

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.workload import Op

READY, RUNNING, DONE = 0, 1, 2
_ready_at = attrgetter("ready_at")


class Exec:
    __slots__ = ("attempts", "item", "qtoken", "state", "waiters")

    def __init__(self, item: ReadyItem, waiters: list[Op]) -> None:
        self.item = item
        self.waiters = waiters
        self.state = READY
        self.attempts = 1
        self.qtoken = 0


class ReadyQueue:
    def __init__(self) -> None:
        # per batch key, in queue order: (push token, exec) entries, stale ones (taken,
        # or pushed again since) left in place until they reach the front; `_items`
        # holds the entries' operators in lockstep, `_execs` the ready ones by key
        self.groups: dict[str, deque[tuple[int, Exec]]] = {}
        self._items: dict[str, deque[ReadyItem]] = {}
        self._execs: dict[str, dict[str, Exec]] = {}
        self.sizes: dict[str, int] = {}
        self.total = 0
        # batch key -> (n, the group of its first n): dropped when they may have changed
        self._kept: dict[str, tuple[int, ReadyGroup]] = {}

    def push(self, e: Exec, front: bool = False) -> None:
        it = e.item
        bk = it.batch_key
        e.state = READY
        e.qtoken += 1
        dq = self.groups.get(bk)
        if dq is None:
            dq = self.groups[bk] = deque()
            self._items[bk] = deque()
            self._execs[bk] = {}
            self.sizes[bk] = 0
        if front:
            # (a push at the back leaves the first n of a kept group as they were)
            self._kept.pop(bk, None)
            dq.appendleft((e.qtoken, e))
            self._items[bk].appendleft(it)
        else:
            dq.append((e.qtoken, e))
            self._items[bk].append(it)
        self._execs[bk][it.key] = e
        self.sizes[bk] += 1
        self.total += 1

    def take(self, e: Exec) -> None:
        """Remove a ready exec (it is about to run)."""
        assert e.state == READY
        e.state = RUNNING
        bk = e.item.batch_key
        self._kept.pop(bk, None)
        del self._execs[bk][e.item.key]
        self.sizes[bk] -= 1
        self.total -= 1
        if self.sizes[bk] == 0:
            del self.sizes[bk]
            del self.groups[bk]
            del self._items[bk]
            del self._execs[bk]

    def head(self, bk: str) -> Exec:
        dq = self.groups[bk]
        while True:
            tok, e = dq[0]
            if e.state == READY and e.qtoken == tok:
                return e
            dq.popleft()
            self._items[bk].popleft()

    def oldest(self, limit: int | None = None) -> list[str]:
        """Batch keys, oldest head first."""
        keys = sorted(self.groups, key=lambda bk: self.head(bk).item.ready_at)
        return keys if limit is None else keys[:limit]

    def first(self, bk: str, n: int) -> list[Exec]:
        out: list[Exec] = []
        if n <= 0:
            return out
        for tok, e in self.groups[bk]:  # skips stale entries, as head() does
            if e.state == READY and e.qtoken == tok:
                out.append(e)
                if len(out) >= n:
                    break
        return out

    def group(self, bk: str, limit: int) -> tuple[ReadyGroup, dict[str, Exec]]:
        """The first `limit` (>= 1) ready operators of `bk` in queue order as a group,
        oldest first (a replayed operator is queued at the front; ties keep queue
        order), and the ready executions of `bk` by operator key (those and more).
        Kept until the first n may have changed; rebuilt from the queue's operators
        without walking it in Python when it holds no stale entry."""
        n = min(self.sizes[bk], limit)
        kept = self._kept.get(bk)
        if kept is not None and kept[0] == n:
            return kept[1], self._execs[bk]
        self.head(bk)  # stale entries at the front go
        if len(self.groups[bk]) == self.sizes[bk]:
            items = list(islice(self._items[bk], n))
        else:  # a take out of the middle: walk past its stale entries
            items = [e.item for e in self.first(bk, n)]
        group = ReadyGroup.of(sorted(items, key=_ready_at))
        self._kept[bk] = (n, group)
        return group, self._execs[bk]
