"""The planner: workflows in, ready operators out, completion recorded.

It consumes submissions, expands each node into record-level operators, keys them by
content, and publishes an operator the moment its inputs exist (data-flow triggering: a
record can be three nodes deep while its neighbours are still in the first). Completions
(`fm.op.done`) advance every workflow waiting on that key.

State is rebuilt, never persisted: on start the planner replays the submission stream;
each workflow that is not finished is expanded again, and every operator whose KV entry
already says `done` completes at once from the KV (the same path that serves completed
dedup). So a SIGKILL of the engine loses nothing: the KV and the streams are the truth.

The planner is composed from parts named for their jobs: intake.py (submissions, replay,
cancel), expansion.py (operators, claims, request records, ready chunks), completion.py
(done operators, nodes and workflows completing), status.py (KV fm_wf); state.py holds
what it keeps per workflow, base.py what the parts share.
"""

from __future__ import annotations

import asyncio

from flowmesh.engine.planner.base import (
    ACCEPT_CONCURRENCY,
    DEFAULT_MAX_ATTEMPTS,
    FANOUT_WINDOW,
    READY_CHUNK,
    max_attempts_from_env,
)
from flowmesh.engine.planner.completion import Completion
from flowmesh.engine.planner.expansion import Expansion
from flowmesh.engine.planner.intake import Intake
from flowmesh.engine.planner.state import NodeRun, Parked, Unresolved, Waiter, WorkflowRun
from flowmesh.engine.planner.status import Status
from flowmesh.engine.supervise import guarded
from flowmesh.topics import streams, subjects

__all__ = [
    "ACCEPT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "FANOUT_WINDOW",
    "READY_CHUNK",
    "NodeRun",
    "Parked",
    "Planner",
    "Unresolved",
    "Waiter",
    "WorkflowRun",
    "max_attempts_from_env",
]


class Planner(Intake, Expansion, Completion, Status):
    """The planner of one shard: its parts, and the tasks that run them."""

    async def start(self) -> None:
        self.kv_ops = await self.bus.kv(streams.KV_OPS)
        self.kv_wf = await self.bus.kv(streams.KV_WF)
        self.kv_exec = await self.bus.kv(streams.KV_EXECUTORS)
        self.kv_models = await self.bus.kv(streams.KV_MODELS)
        self.kv_requests = await self.bus.kv(streams.KV_REQUESTS)
        self._tasks = [
            asyncio.create_task(
                guarded("planner", "submissions", self._submissions_loop, self._stopping)
            ),
            asyncio.create_task(guarded("planner", "completions", self._done_loop, self._stopping)),
            asyncio.create_task(guarded("planner", "status", self._status_loop, self._stopping)),
            asyncio.create_task(guarded("planner", "parked", self._parked_loop, self._stopping)),
        ]
        self._stop_cancels = await self.bus.transport.listen(subjects.CANCEL, self._on_cancel)

    async def stop(self) -> None:
        self._stopping.set()
        if self._stop_cancels is not None:
            await self._stop_cancels()
        accepts = list(self._accepts.values())
        for t in [*self._tasks, *accepts]:
            t.cancel()
        await asyncio.gather(*self._tasks, *accepts, return_exceptions=True)
        await self._flush_status()
