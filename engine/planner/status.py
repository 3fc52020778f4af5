"""Status: each workflow's WorkflowStatus in KV fm_wf, written when it changed (at most
every status interval) and at once when it finishes."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time

import nats.errors
import structlog

from flowmesh.engine import metrics
from flowmesh.engine.planner.base import PlannerBase
from flowmesh.engine.planner.state import WorkflowRun
from flowmesh.topics import codec, streams

log = structlog.get_logger("flowmesh.planner")


class Status(PlannerBase):
    """Each workflow's status, written to KV fm_wf when it changed."""

    async def _status_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.status_interval_s)
            await self._flush_status()

    async def _flush_status(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for wf_id in dirty:
            run = self.runs.get(wf_id)
            if run is None:
                continue
            try:
                await self._write_status(run)
            except nats.errors.Error as exc:
                # a nats restart: written on a later round
                self._dirty.add(wf_id)
                log.warning("status write failed", workflow=wf_id, error=repr(exc))

    async def _write_status(self, run: WorkflowRun) -> None:
        if run.state == "running" and run.ops_done() < run.done_floor:
            # replaying after a restart: the recorded status shows more; written once
            # the replay caught up (every completion marks the run dirty again)
            self._dirty.discard(run.wf_id)
            return
        run.done_floor = 0
        data = codec.encode(run.to_status())
        if len(data) > streams.MAX_MESSAGE_BYTES and run.state == "running":
            # it could never be written (the tenant would see "not found" and this would
            # retry forever): the run fails, and says why, in a status that fits
            run.state, run.ended_at = "failed", time.time()
            run.error = (
                f"the workflow's status ({len(data)} bytes) is too large to record; "
                "split the workflow"
            )
            data = codec.encode(dataclasses.replace(run, nodes={}).to_status())
        await self.bus.retrying("write status", functools.partial(self.kv_wf.put, run.wf_id, data))
        self._dirty.discard(run.wf_id)
        # finished: its status lives in the KV; a replayed submission is skipped there
        if run.state != "running" and self.runs.pop(run.wf_id, None) is not None:
            metrics.workflow_finished(run.spec.tenant, run.state)
            metrics.workflows_running(len(self.runs))
