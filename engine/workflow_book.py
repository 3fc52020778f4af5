"""What the autoscaler reads of the workflows each round, kept up to date by a watcher
of their status entries (KV fm_wf) instead of read whole every round.

A round needs, of every workflow: when it was submitted (the arrival rate), whether it
runs, and of a running one the pools its unfinished nodes run in and the operators soon
ready per kind (`engine.autoscaler.soon_ready`). Reading and decoding every status each
round grew with the workflows kept: 73-88 ms at 1,000, 1.46-1.49 s at 20,000 (a private
nats-server here, 1.3 kB statuses). The book reads the bucket once, then only the
entries that changed: each round decodes the latest value of each workflow updated since
the last one.

Entries are applied by revision, so the first read (a scan) and the watcher's replay of
the same values can come in any order, and a change seen twice is applied once. After a
lost connection (a nats restart may end the watcher's consumer) the book is read again
from scratch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.messages import WorkflowStatus

log = structlog.get_logger("flowmesh.autoscaler")

DRAIN_WAIT_S = 0.05  # how long a round waits for the next change before it stops reading
DRAIN_MAX = 100_000  # changes read in one round at most (the rest in the next)


@dataclass(frozen=True)
class Summary:
    """Of one workflow, what the autoscaler uses."""

    submitted_at: float
    running: bool
    pools: frozenset[str]
    soon: Counter[str]


@dataclass
class WorkflowBook:
    """The workflows' summaries by id, kept from their status entries. `summarize` is
    given each status as it is decoded (the autoscaler's rules for pools and soon-ready
    work)."""

    bus: Bus
    summarize: Callable[[WorkflowStatus], Summary]
    book: dict[str, Summary] = field(default_factory=dict)
    _revisions: dict[str, int] = field(default_factory=dict)  # deleted keys' too
    _watcher: Any = None
    _reconnects: int = -1

    async def refresh(self) -> None:
        """Bring the book up to now: read the bucket whole the first time (and after a
        lost connection), then the changes since the last call."""
        if self._watcher is None or self.bus.reconnects != self._reconnects:
            await self._restart()
        latest: dict[str, tuple[int, bytes | None]] = {}
        for _ in range(DRAIN_MAX):
            try:
                entry = await self._watcher.updates(timeout=DRAIN_WAIT_S)
            except TimeoutError:
                break
            except Exception:
                await self.close()  # the next round reads the bucket whole again
                raise
            if entry is None:
                continue  # the end of the watcher's first values
            deleted = entry.operation in ("DEL", "PURGE") or not entry.value
            seen = latest.get(entry.key)
            rev = entry.revision or 0
            if seen is None or rev > seen[0]:
                latest[entry.key] = (rev, None if deleted else entry.value)
        self._apply(latest)

    def _apply(self, latest: dict[str, tuple[int, bytes | None]]) -> None:
        for key, (rev, value) in latest.items():
            if rev <= self._revisions.get(key, 0):
                continue  # the scan (or an earlier round) had this one or a newer one
            self._revisions[key] = rev
            if value is None:
                self.book.pop(key, None)
                continue
            try:
                st = codec.decode(value, WorkflowStatus)
            except codec.DecodeError:
                continue
            self.book[key] = self.summarize(st)

    async def _restart(self) -> None:
        await self.close()
        self.book.clear()
        self._revisions.clear()
        self._reconnects = self.bus.reconnects
        kv = await self.bus.kv(streams.KV_WF)
        # the watcher first, then the scan: a change made between the two is in the
        # watcher's stream, and the scan's values (newer than the watcher's first ones)
        # are kept by revision
        self._watcher = await kv.watchall()
        scan = await self.bus.kv_items(streams.KV_WF)
        self._apply({key: (rev, value) for key, value, rev in scan})
        log.info("workflow book read", workflows=len(self.book))

    def totals(self) -> tuple[int, frozenset[str], list[float], Counter[str]]:
        """(running workflows, the pools they still need, every submission time sorted,
        operators soon ready per kind)."""
        running = 0
        pools: set[str] = set()
        soon: Counter[str] = Counter()
        for s in self.book.values():
            if s.running:
                running += 1
                pools |= s.pools
                soon.update(s.soon)
        return running, frozenset(pools), sorted(s.submitted_at for s in self.book.values()), soon

    async def close(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            try:
                await watcher.stop()
            except Exception as exc:  # the connection may be gone already
                log.debug("workflow watcher stop failed", error=repr(exc))
