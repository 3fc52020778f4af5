"""The virtual clock: a heap of timed events, popped in (time, insertion) order, so a run
is a pure function of its inputs and seed (no wall clock anywhere)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Ev(IntEnum):
    ARRIVE = 0  # a workflow arrives
    DONE = 1  # a batch finished on a worker
    KILL = 2  # a worker is preempted
    RETURN = 3  # a preempted worker's slot is back
    RELEASE = 4  # an idle worker's release timer
    WAKE = 5  # nothing but a scheduling round (linger)


@dataclass
class Clock:
    now: float = 0.0
    _heap: list[tuple[float, int, Ev, Any, int]] = field(default_factory=list)
    _seq: int = 0

    def at(self, when: float, ev: Ev, obj: Any = None, token: int = 0) -> None:
        """Schedule `ev` at virtual time `when` (never in the past)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, ev, obj, token))

    def pop(self) -> tuple[Ev, Any, int]:
        when, _, ev, obj, token = heapq.heappop(self._heap)
        self.now = when
        return ev, obj, token

    def next_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
