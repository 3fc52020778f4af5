"""Ready operators waiting for a worker, grouped by batch key, oldest first.

An `Exec` is one unit of execution: under content dedup one per distinct key in flight
(every workflow operator that asked for that key waits on it), otherwise one per
workflow operator. Taking an exec out of a group is O(1) (lazy deletion: a stale entry
is skipped when the group is read), so a round may pick any of a group's members.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler.policy import ReadyItem

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.workload import Op

READY, RUNNING, DONE = 0, 1, 2


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
        self.groups: dict[str, deque[tuple[int, Exec]]] = {}
        self.sizes: dict[str, int] = {}
        self.total = 0

    def push(self, e: Exec, front: bool = False) -> None:
        bk = e.item.batch_key
        e.state = READY
        e.qtoken += 1
        dq = self.groups.get(bk)
        if dq is None:
            dq = self.groups[bk] = deque()
            self.sizes[bk] = 0
        if front:
            dq.appendleft((e.qtoken, e))
        else:
            dq.append((e.qtoken, e))
        self.sizes[bk] += 1
        self.total += 1

    def take(self, e: Exec) -> None:
        """Remove a ready exec (it is about to run)."""
        assert e.state == READY
        e.state = RUNNING
        bk = e.item.batch_key
        self.sizes[bk] -= 1
        self.total -= 1
        if self.sizes[bk] == 0:
            del self.sizes[bk]
            del self.groups[bk]

    def head(self, bk: str) -> Exec:
        dq = self.groups[bk]
        while True:
            tok, e = dq[0]
            if e.state == READY and e.qtoken == tok:
                return e
            dq.popleft()

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
