"""Intake: submissions in (read side by side, replayed from the stream's first message
on every start), each workflow accepted or rejected and its sources fanned out; cancel."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

import structlog
from nats.js.errors import KeyNotFoundError

from flowmesh.engine import keys, metrics
from flowmesh.engine.planner.base import PlannerBase
from flowmesh.engine.planner.state import NodeRun, WorkflowRun
from flowmesh.engine.shards import shard_of
from flowmesh.engine.spec import SpecError, topo_order, validate
from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.messages import CancelWorkflow, NodeStatus, SubmitWorkflow, WorkflowStatus
from flowmesh.topics.operators import KINDS
from flowmesh.topics.store.cas import CASError

log = structlog.get_logger("flowmesh.planner")


def _digests_of(records: list[dict[str, Any]]) -> tuple[list[str], int]:
    """The records' digests, and what they weigh together as canonical JSON."""
    blobs = [codec.canonical(r) for r in records]
    return [codec.sha256_hex(b) for b in blobs], sum(map(len, blobs))


def _json_bytes(records: list[dict[str, Any]]) -> int:
    return sum(len(codec.canonical(r)) for r in records)


def _decode_quietly(data: bytes) -> SubmitWorkflow | None:
    if len(data) > streams.MAX_MESSAGE_BYTES:
        return None
    try:
        return codec.decode(data, SubmitWorkflow)
    except codec.DecodeError:
        return None


class Intake(PlannerBase):
    """Submissions in, side by side; a workflow accepted, rejected or cancelled."""

    async def _on_cancel(self, data: bytes) -> None:
        """Stop a running workflow of this shard: no operator of it starts any more, its
        waiters go, and its status says `cancelled` (a replay skips it from then on)."""
        try:
            req = codec.decode(data, CancelWorkflow)
        except codec.DecodeError:
            return
        run = self.runs.get(req.workflow_id)
        if run is None or run.state != "running":
            return
        run.state = "cancelled"
        run.error = req.reason
        run.ended_at = time.time()
        for key in [k for k, ws in self.waiters.items() if any(w.run is run for w in ws)]:
            kept = [w for w in self.waiters[key] if w.run is not run]
            if kept:
                self.waiters[key] = kept
            else:
                del self.waiters[key]
        self.parked = [p for p in self.parked if p.run is not run]
        self._dirty.add(run.wf_id)
        await self._write_status(run)
        log.info("workflow cancelled", workflow=run.wf_id, reason=req.reason)

    async def _submissions_loop(self) -> None:
        # Every submission from the first: replaying them is how a restarted planner
        # finds the workflows still running. A replay that went stale (a nats restart
        # killed its server-side consumer) is made again from the next sequence.
        while not self._stopping.is_set():
            sub = await self.bus.transport.replay(subjects.SUBMIT, self._resume_seq())
            try:
                while not sub.stale and not self._stopping.is_set():
                    self._raise_accept_error()
                    try:
                        records = await sub.fetch(64, timeout=1.0)
                    except TimeoutError:
                        continue
                    for r in records:
                        await self._take_in(r.seq, r.subject, r.data)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _raise_accept_error(self) -> None:
        if (error := self._accept_error) is not None:
            # as when submissions were handled in turn: the loop restarts (guarded) and
            # resumes before the one that failed
            self._accept_error = None
            raise error

    async def _take_in(self, seq: int, subject: str, data: bytes) -> None:
        """Hand submission `seq` (1 and up, in stream order) to a task of its own, once
        one of ACCEPT_CONCURRENCY slots is free."""
        if seq in self._accepts or (seq <= self._submit_seq and seq not in self._unhandled):
            return  # in hand, or handled (a re-created consumer's replay)
        await self._accept_slots.acquire()
        self._submit_seq = max(self._submit_seq, seq)
        self._unhandled.add(seq)
        self._accepts[seq] = asyncio.create_task(self._accept(seq, subject, data))

    def _resume_seq(self) -> int:
        """The last submission sequence below which every one was handled."""
        return min(self._unhandled) - 1 if self._unhandled else self._submit_seq

    async def _accept(self, seq: int, subject: str, data: bytes) -> None:
        """One submission, handled beside the others (ACCEPT_CONCURRENCY at once)."""
        try:
            await self.handle_submission(subject, data)
            self._unhandled.discard(seq)
        except Exception as exc:
            # raised in the submissions loop, which restarts and reads it again
            log.warning("submission failed; it will be read again", seq=seq, error=repr(exc))
            self._accept_error = exc
        finally:
            del self._accepts[seq]
            self._accept_slots.release()

    async def handle_submission(self, subject: str, data: bytes) -> None:
        if self.shard == 0:
            sub = await self.bus.decode_or_dead_letter("planner", subject, data, SubmitWorkflow)
        else:
            sub = _decode_quietly(data)  # shard 0 dead-letters it: one record, not N
        if sub is None:
            return
        wf_id = sub.workflow_id
        if shard_of(wf_id, self.shards) != self.shard:
            return  # another shard's workflow (it dead-letters it if it is malformed)
        if wf_id in self.runs or wf_id in self._accepting or not subjects.is_token(wf_id):
            if wf_id not in self.runs and wf_id not in self._accepting:
                await self.bus.dead_letter("planner", subject, f"bad workflow id {wf_id!r}", data)
            return
        # a duplicate submission handled beside this one waits for nothing: it is skipped
        self._accepting.add(wf_id)
        try:
            await self._handle_new(sub, wf_id)
        finally:
            self._accepting.discard(wf_id)

    async def _handle_new(self, sub: SubmitWorkflow, wf_id: str) -> None:
        recorded: WorkflowStatus | None = None
        try:
            get = functools.partial(self.kv_wf.get, wf_id)
            entry = await self.bus.retrying("read workflow", get)
            if entry.value:
                recorded = codec.decode(entry.value, WorkflowStatus)
                if recorded.state != "running":
                    return  # finished before this planner started
        except KeyNotFoundError:
            pass
        try:
            validate(sub.spec)
            order = topo_order(sub.spec)
        except SpecError as exc:
            await self._reject(sub, str(exc))
            return
        except Exception as exc:
            # a validator bug must cost one submission, never the submissions loop: it
            # would re-read this message after its restart and stall every tenant
            log.exception("spec validation crashed", workflow=wf_id)
            await self._reject(sub, f"spec could not be validated: {type(exc).__name__}: {exc}")
            return
        run = self._new_run(sub, order)
        if recorded is not None:
            run.done_floor = sum(n.done for n in recorded.nodes.values())
        self.runs[wf_id] = run
        self._dirty.add(wf_id)
        log.info("workflow accepted", workflow=wf_id, tenant=sub.spec.tenant, nodes=len(order))
        metrics.workflows_running(len(self.runs))
        # every dataset read and recorded before any is fanned out: an outage here
        # (longer than the store's own retries) forgets the run, and the submission is
        # read again (it stayed unhandled); once fanned out, a run is never forgotten
        loaded: list[tuple[str, list[str], str]] = []
        for name, ds in sub.spec.datasets.items():
            try:
                if ds.digest is None:
                    raise CASError("dataset was not uploaded (no digest)")
                records = await self.cas.get_table(ds.digest)
                node = run.nodes[name]
                if self._whole_readers(run, name):
                    # an operator reads the whole dataset: its records as blobs
                    digests = await self.cas.put_records(records)  # off the event loop
                    size = await asyncio.to_thread(_json_bytes, records)
                else:
                    # only record operators read it: each reads its row from the table
                    # (table digest, row), so the data is not stored a second time, one
                    # blob per record; their keys still cover each record's content
                    digests, size = await asyncio.to_thread(_digests_of, records)
                    node.table = ds.digest
                node.out_bytes, node.out_records = size, len(records)
                manifest = await self.cas.put_manifest(digests)
            except CASError as exc:  # a full disk too: the workflow fails, and says so
                if recorded is None:
                    metrics.workflow_submitted(sub.spec.tenant)
                await self._fail(run, f"dataset {name!r}: {exc}")
                return
            except Exception:
                if self.runs.get(wf_id) is run:
                    del self.runs[wf_id]
                    self._dirty.discard(wf_id)
                    metrics.workflows_running(len(self.runs))
                metrics.planner_retry("accept")
                raise
            loaded.append((name, digests, manifest))
        if recorded is None:
            # counted once: not again when an accept that failed above is retried, nor
            # when a restarted planner takes up a running workflow
            metrics.workflow_submitted(sub.spec.tenant)
        for name, digests, manifest in loaded:
            node = run.nodes[name]
            # the manifest first: the status names the source data even if the run
            # fails while it fans out
            node.manifest = manifest
            for i, d in enumerate(digests):
                node.outputs[(i,)] = [d]
            node.upstream_complete = True
            await self._fan_out(run, name, [((i,), [d]) for i, d in enumerate(digests)])
            await self._maybe_complete(run, name)

    @staticmethod
    def _whole_readers(run: WorkflowRun, name: str) -> bool:
        return any(
            (k := run.nodes[c].kind) is not None and k.fanout == "all"
            for c in run.nodes[name].downstream
        )

    def _new_run(self, sub: SubmitWorkflow, order: list[str]) -> WorkflowRun:
        spec = sub.spec
        nodes: dict[str, NodeRun] = {
            name: NodeRun(name=name, spec=None, kind=None, inputs=[]) for name in spec.datasets
        }
        by_name = {n.name: n for n in spec.nodes}
        for name in order:
            n = by_name[name]
            nodes[name] = NodeRun(
                name=name,
                spec=n,
                kind=KINDS[n.op],
                inputs=list(n.inputs),
                status=NodeStatus(spec=n),
            )
        for name in order:
            for inp in by_name[name].inputs:
                nodes[inp].downstream.append(name)
        return WorkflowRun(
            wf_id=sub.workflow_id,
            spec=spec,
            salt=keys.scope_salt(spec.dedup_scope, spec.tenant, sub.workflow_id),
            submitted_at=sub.submitted_at,
            nodes=nodes,
        )

    async def _reject(self, sub: SubmitWorkflow, error: str) -> None:
        status = WorkflowStatus(
            workflow_id=sub.workflow_id,
            name=sub.spec.name,
            tenant=sub.spec.tenant,
            state="failed",
            submitted_at=sub.submitted_at,
            updated_at=time.time(),
            nodes={},
            error=error,
            ended_at=time.time(),
        )
        await self.kv_wf.put(sub.workflow_id, codec.encode(status))
        log.warning("workflow rejected", workflow=sub.workflow_id, error=error)
        metrics.workflow_finished(sub.spec.tenant, "rejected")
