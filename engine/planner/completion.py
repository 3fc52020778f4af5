"""Completion: done operators (`fm.op.done`) advance every workflow waiting on them,
a node completes when its last operator does, and a workflow when all its nodes do;
operators parked for an executor no worker advertises yet are retried or failed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import nats.errors
import structlog

from flowmesh.engine import metrics
from flowmesh.engine.planner.base import FANOUT_WINDOW, PlannerBase
from flowmesh.engine.planner.state import Parked, Pos, Retry, WorkflowRun
from flowmesh.engine.shards import done_consumer_name
from flowmesh.topics import codec
from flowmesh.topics.messages import OP_CANCELLED, DoneBatch, OpDone, OpFailure
from flowmesh.topics.operators import executor_id
from flowmesh.topics.store.cas import CASError

log = structlog.get_logger("flowmesh.planner")


class Completion(PlannerBase):
    """Completions in: slots, nodes and workflows complete, or fail."""

    async def _done_loop(self) -> None:
        # one durable consumer per shard: every shard sees every completion
        psub = await self.bus.transport.done_consumer(done_consumer_name(self.shard, self.shards))
        while not self._stopping.is_set():
            try:
                msgs = await psub.fetch(256, timeout=1.0)
            except TimeoutError:
                continue
            except nats.errors.Error as exc:
                # a nats restart: the durable consumer survives it; fetch again
                log.warning("fetching completions failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            dones: list[OpDone] = []
            for msg in msgs:
                batch = await self.bus.decode_or_dead_letter(
                    "planner", msg.subject, msg.data, DoneBatch
                )
                if batch is None:
                    await msg.term()
                    continue
                dones.extend(batch.done)
            # every completion fetched is handled as one wave: children of all of them
            # start together (one round of claims, a few ready chunks)
            try:
                await self.complete_keys(dones)
            except Exception as exc:
                # refused before any waiter was taken (a result it could not read):
                # delivered again, the wave is handled again
                metrics.planner_retry("done")
                log.warning("completions failed; delivered again", error=repr(exc))
                for msg in msgs:
                    with contextlib.suppress(Exception):  # a lost nak: ack_wait redelivers
                        await msg.nak(delay=1.0)
                continue
            for msg in msgs:
                with contextlib.suppress(Exception):  # a lost ack: redelivered, a no-op
                    await msg.ack()

    async def complete_key(self, done: OpDone) -> None:
        await self.complete_keys([done])

    async def complete_keys(self, dones: list[OpDone]) -> None:
        """Completions in: every workflow waiting on them advances, and the operators
        they make ready start as one wave per node.

        Retry-safe: the waiters are taken only after the last step that may raise (the
        results read); from there on nothing raises (a wave of children the bus refuses
        is started again by the retry loop, see _start_ops), so a completion is either
        taken whole or left for its redelivered message."""
        dones = [done for done in dones if self.waiters.get(done.key)]
        if not dones:
            return
        # inline outputs (the usual case) are read here; only manifests need the store,
        # and only they become tasks (a task per completion was a fifth of a wave's CPU)
        read = [_inline_outputs(done) for done in dones]
        stored = [i for i, r in enumerate(read) if r is None]
        if stored:
            from_store = await asyncio.gather(*(self._outputs_of(dones[i]) for i in stored))
            for i, r in zip(stored, from_store, strict=True):
                read[i] = r
        # taken now, with no await before they are counted (waiters that joined while
        # the results were read are taken too: they were waiting for these)
        taken = [
            (done, out, self.waiters.pop(done.key, []))
            for done, out in zip(dones, read, strict=True)
            if out is not None
        ]
        got = [(done, waiters) for done, _, waiters in taken if waiters]
        outputs = [out for _, out, waiters in taken if waiters]
        # successes first: a wave that also fails the workflow still counts what it
        # completed (the status says how far the workflow got)
        order = sorted(range(len(got)), key=lambda i: outputs[i][0].status == "failed")
        got = [got[i] for i in order]
        outputs = [outputs[i] for i in order]
        # per (workflow, node): the operators its completed slots feed, counted at once
        new: dict[tuple[str, str], tuple[WorkflowRun, dict[str, list[tuple[Pos, list[str]]]]]] = {}
        # operators stopped because the workflow that claimed them was cancelled: the
        # workflows still waiting for them claim them again (exactly one re-runs it)
        again: dict[tuple[str, str], tuple[WorkflowRun, list[tuple[Pos, list[str]]]]] = {}
        for (done, waiters), (status_done, outs) in zip(got, outputs, strict=True):
            for w in waiters:
                if w.run.state != "running":
                    continue
                node = w.run.nodes[w.node]
                if (
                    status_done.status == "failed"
                    and status_done.error == OP_CANCELLED
                    and status_done.workflow_id != w.run.wf_id
                ):
                    starts = again.setdefault((w.run.wf_id, w.node), (w.run, []))[1]
                    starts.append((w.pos, w.inputs))
                    continue
                if status_done.status == "failed":
                    node.status.failed += 1
                    w.run.failure = OpFailure(
                        node=w.node,
                        key=done.key,
                        error=status_done.error or "unknown error",
                        traceback=status_done.traceback,
                        attempts=status_done.attempts,
                        worker=status_done.worker,
                    )
                    tries = f" after {done.attempts} attempts" if done.attempts > 1 else ""
                    await self._fail(
                        w.run,
                        f"node {w.node!r} operator {done.key[:12]} failed{tries}: "
                        f"{status_done.error}",
                    )
                    continue
                if node.outputs.get(w.pos) is not None:
                    continue  # already counted (a duplicate completion)
                node.outputs[w.pos] = outs
                node.out_bytes += status_done.output_bytes
                node.out_records += len(outs)
                node.pending -= 1
                node.status.done += 1
                self._dirty.add(w.run.wf_id)
                children = new.setdefault((w.run.wf_id, w.node), (w.run, {}))[1]
                for child, starts in self._count_children(w.run, w.node, [(w.pos, outs)]).items():
                    children.setdefault(child, []).extend(starts)
        for (_, name), (run, starts) in again.items():
            log.info("re-claiming operators of a cancelled workflow", workflow=run.wf_id, node=name)
            await self._start_ops(run, name, starts)
        for (_, name), (run, children) in new.items():
            await self._start_children(run, children)
            await self._maybe_complete(run, name)

    async def _outputs_of(self, done: OpDone) -> tuple[OpDone, list[str]]:
        """The completion (turned `failed` if its result is unreadable) and its output
        record digests: inline, or read from its manifest."""
        inline = _inline_outputs(done)
        if inline is not None or not done.output:
            return inline or (done, [])
        try:
            return done, await self.cas.get_manifest(done.output)
        except CASError as exc:
            return OpDone(key=done.key, status="failed", error=f"result unreadable: {exc}"), []

    async def _maybe_complete(self, run: WorkflowRun, name: str) -> None:
        # a worklist, not recursion: a chain of ~970 record nodes completing in turn hit
        # Python's recursion limit here and left the workflow running forever
        todo = [name]
        while todo:
            await self._complete_node(run, todo.pop(), todo)
        if all(n.complete for n in run.nodes.values()) and run.state == "running":
            run.state = "completed"
            run.ended_at = time.time()
            await self._write_status_or_later(run)
            log.info(
                "workflow completed",
                workflow=run.wf_id,
                seconds=round(run.ended_at - run.submitted_at, 3),
            )

    async def _complete_node(self, run: WorkflowRun, name: str, todo: list[str]) -> None:
        """Complete `name` if it can be; record-fanout children that may complete in turn
        go on `todo`."""
        node = run.nodes[name]
        if node.complete or not node.upstream_complete or node.pending > 0:
            return
        ordered = [d for pos in sorted(node.outputs) for d in (node.outputs[pos] or [])]
        try:
            node.manifest = await self.cas.put_manifest(ordered)
            if node.keys:
                node.status.ops = await self.cas.put_manifest(
                    [node.keys[p] for p in sorted(node.keys)]
                )
        except CASError as exc:  # a full disk, a store that refuses: this run fails
            await self._fail(run, f"node {name!r}: cannot store its output manifest: {exc}")
            return
        except Exception as exc:  # an outage longer than the store's own retries
            self._retry_later(
                Retry("complete", run, functools.partial(self._maybe_complete, run, name)), exc
            )
            return
        node.complete = True
        node.ordered = ordered
        node.status.complete = True
        node.status.output = node.manifest
        node.status.n_outputs = len(node.ordered)
        self._dirty.add(run.wf_id)
        await self._release_adapter_users(run, name)
        for child_name in node.downstream:
            child = run.nodes[child_name]
            assert child.kind is not None
            if child.kind.fanout == "record":
                child.upstream_complete = True
                todo.append(child_name)
            elif all(run.nodes[i].complete for i in child.inputs):
                child.upstream_complete = True
                child.outputs[(0,)] = None
                child.pending += 1
                child.status.total += 1
                inputs = [run.nodes[i].manifest or "" for i in child.inputs]
                await self._start_op(run, child_name, (0,), inputs)

    async def _release_adapter_users(self, run: WorkflowRun, name: str) -> None:
        """`name` completed: nodes that generate with the adapter it trained may start."""
        users = [n for n in run.nodes.values() if n.spec is not None and n.spec.adapter == name]
        if not users:
            return
        node = run.nodes[name]
        digest = None
        if node.ordered:
            try:
                digest = (await self.cas.get_record(node.ordered[0])).get("adapter")
            except CASError as exc:
                await self._fail(run, f"node {name!r}: its adapter record is unreadable: {exc}")
                return
            except Exception as exc:  # an outage: read again (nothing released yet)
                step = functools.partial(self._release_adapter_users, run, name)
                self._retry_later(Retry("adapter", run, step), exc)
                return
        if not isinstance(digest, str) or not codec.is_digest(digest):
            await self._fail(run, f"node {name!r} produced no adapter for {users[0].name!r}")
            return
        for user in users:
            user.adapter_digest = digest
            deferred, user.deferred = user.deferred, []
            for i in range(0, len(deferred), FANOUT_WINDOW):
                await self._start_ops(run, user.name, deferred[i : i + FANOUT_WINDOW])

    async def _fail(self, run: WorkflowRun, error: str) -> None:
        if run.state != "running":
            return
        run.state = "failed"
        run.error = error
        run.ended_at = time.time()
        await self._write_status_or_later(run)
        log.warning("workflow failed", workflow=run.wf_id, error=error)

    async def _write_status_or_later(self, run: WorkflowRun) -> None:
        """A finished run's status, written now or, if the bus refuses, by the status
        loop: never raised into a completion wave half done."""
        self._dirty.add(run.wf_id)
        try:
            await self._write_status(run)
        except Exception as exc:
            log.warning("status write failed; written later", workflow=run.wf_id, error=repr(exc))

    async def _parked_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(0.5)
            # steps the bus or the store refused: done again (a refusal queues one again)
            retries, self.retries = self.retries, []
            for r in retries:
                if r.run.state == "running":
                    await r.step()
            parked, self.parked = self.parked, []
            groups: dict[tuple[str, str], list[Parked]] = {}
            for p in parked:
                if p.run.state == "running":
                    groups.setdefault((p.run.wf_id, p.node), []).append(p)
            for group in groups.values():
                p = group[0]
                since = min(g.since for g in group)
                if time.monotonic() - since > self.resolve_wait_s:
                    node = p.run.nodes[p.node]
                    assert node.spec is not None and node.kind is not None
                    what = executor_id(node.kind.name, node.spec.fn)
                    if node.spec.model:
                        what += f" with model {node.spec.model!r}"
                    await self._fail(
                        p.run,
                        f"node {p.node!r}: no worker advertises {what} "
                        f"(waited {self.resolve_wait_s:.0f}s; is the transform registered?)",
                    )
                    continue
                before = len(self.parked)
                for i in range(0, len(group), FANOUT_WINDOW):
                    part = group[i : i + FANOUT_WINDOW]
                    await self._start_ops(p.run, p.node, [(g.pos, g.inputs) for g in part])
                for again in self.parked[before:]:
                    # still unresolved: keep the original arrival time
                    again.since = since


def _inline_outputs(done: OpDone) -> tuple[OpDone, list[str]] | None:
    """What Completion._outputs_of returns, when it needs no read from the store."""
    if done.status != "done":
        return done, []
    if done.outputs is not None:
        return done, list(done.outputs)
    if not done.output:
        return done, []
    return None
