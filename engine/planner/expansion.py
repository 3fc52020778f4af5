"""Expansion: a node's new inputs become record-level operators, keyed by content,
claimed in KV fm_ops (dedup), recorded as requests, and published as ready chunks."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import Any

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from flowmesh.engine import keys, metrics
from flowmesh.engine.planner.base import FANOUT_WINDOW, READY_CHUNK, PlannerBase
from flowmesh.engine.planner.state import (
    Parked,
    Pos,
    Retry,
    Unresolved,
    Waiter,
    WorkflowRun,
)
from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.messages import (
    RAN_PREFIX,
    NodeSpec,
    OpDone,
    OpItem,
    OpRequest,
    OpSpec,
    OpState,
    RanRequests,
    ReadyChunk,
    RequestRole,
)
from flowmesh.topics.operators import NONDETERMINISTIC, OperatorKind, executor_id, parse_params

log = structlog.get_logger("flowmesh.planner")


def _chunk_id(chunk: ReadyChunk) -> str:
    """The message id of a ready chunk: the same operators at the same revisions (a
    replayed submission) are dropped by the server as a duplicate."""
    return "ready-" + codec.digest_of([[it.key, it.revision] for it in chunk.items])


def _ran_id(node: str, keys_: list[str]) -> str:
    """The KV fm_requests key of a wave's `ran` requests (before ".<workflow id>"): the
    same operators of the same node (a replayed submission) name the same entry."""
    return RAN_PREFIX + codec.digest_of([node, keys_])


class Expansion(PlannerBase):
    """Operators started: keyed, claimed, recorded and published in waves."""

    async def _fan_out(
        self, run: WorkflowRun, name: str, slots: list[tuple[Pos, list[str]]]
    ) -> None:
        """New output records at `name`: start the record-level operators they feed."""
        await self._start_children(run, self._count_children(run, name, slots))

    @staticmethod
    def _count_children(
        run: WorkflowRun, name: str, slots: list[tuple[Pos, list[str]]]
    ) -> dict[str, list[tuple[Pos, list[str]]]]:
        """The record-level operators that new outputs of `name` feed, counted as pending
        in their nodes now, without an await. A slot counted done whose children are not
        yet counted would let another task see the child node complete without them
        (`pending` 0 once its parent completed): it did, in a completion wave of reused
        operators, and the workflow completed with records missing."""
        children: dict[str, list[tuple[Pos, list[str]]]] = {}
        for child_name in run.nodes[name].downstream:
            child = run.nodes[child_name]
            if child.kind is None or child.kind.fanout != "record":
                continue
            starts = children.setdefault(child_name, [])
            for pos, records in slots:
                for j, rec in enumerate(records):
                    cpos = (*pos, j)
                    child.outputs[cpos] = None
                    child.pending += 1
                    child.status.total += 1
                    starts.append((cpos, [rec]))
        return children

    async def _start_children(
        self, run: WorkflowRun, children: dict[str, list[tuple[Pos, list[str]]]]
    ) -> None:
        for child_name, starts in children.items():
            # in waves: each is one pipelined round of claims and a few ready chunks
            for i in range(0, len(starts), FANOUT_WINDOW):
                await self._start_ops(run, child_name, starts[i : i + FANOUT_WINDOW])

    async def _start_op(self, run: WorkflowRun, name: str, pos: Pos, inputs: list[str]) -> None:
        await self._start_ops(run, name, [(pos, inputs)])

    async def _start_ops(
        self, run: WorkflowRun, name: str, starts: list[tuple[Pos, list[str]]]
    ) -> None:
        """Start operators of one node as one wave: their claims in KV fm_ops and their
        request records are written pipelined, and those this wave must run go out as
        ready chunks (one message per READY_CHUNK operators, the spec once).

        Never raises for a refused write or publish (a timeout, a lost connection, a
        full store): the wave's waiters are taken back and the whole wave is started
        again by the retry loop. Its operators stay counted pending meanwhile, so their
        node cannot complete without them; every step of a wave is safe to repeat
        (claims find their own entries, request records are created once, ready chunks
        carry a message id). Raised out of a completion wave, it stranded the workflow:
        the done message was redelivered to waiters already taken."""
        if run.state != "running" or not starts:
            return
        added: list[tuple[str, Waiter]] = []
        try:
            await self._start_wave(run, name, starts, added)
        except Exception as exc:
            for key, waiter in added:
                kept = [w for w in self.waiters.get(key, []) if w is not waiter]
                if kept:
                    self.waiters[key] = kept
                else:
                    self.waiters.pop(key, None)
            self._retry_later(
                Retry("start", run, functools.partial(self._start_ops, run, name, starts)), exc
            )

    async def _start_wave(
        self,
        run: WorkflowRun,
        name: str,
        starts: list[tuple[Pos, list[str]]],
        added: list[tuple[str, Waiter]],
    ) -> None:
        """_start_ops' work; each waiter it registers is noted in `added`."""
        node = run.nodes[name]
        assert node.spec is not None and node.kind is not None
        if node.spec.adapter and node.adapter_digest is None:
            node.deferred.extend(starts)  # started when the adapter exists
            return
        try:
            base = await self._op_spec(node.spec, node.kind, [], node.adapter_digest)
        except Unresolved:
            now = time.monotonic()
            self.parked.extend(Parked(run, name, pos, inputs, now) for pos, inputs in starts)
            return
        except ValueError as exc:
            await self._fail(run, f"node {name!r}: {exc}")
            return
        nondet = base.version.endswith(NONDETERMINISTIC)
        # a record operator over a source read from its table: slot (i, 0) is row i
        table = run.nodes[node.inputs[0]].table if node.kind.fanout == "record" else None
        bkey = keys.batch_key(base)
        # what an operator reads: a record operator, one record per input, each weighing
        # what its node's records weigh on average so far; an `all` operator, every
        # record of its input nodes (its inputs are their manifests, one each)
        if node.kind.fanout == "all":
            whole, per_input = sum(run.nodes[i].out_bytes for i in node.inputs), 0.0
        else:
            whole = 0
            per_input = sum(run.nodes[i].record_bytes() for i in node.inputs) / max(
                len(node.inputs), 1
            )
        now = time.time()
        keyer = keys.OpKeyer(base, run.salt)
        wave: list[tuple[str, OpSpec, OpState, bool]] = []
        rows: dict[str, int] = {}
        for pos, inputs in starts:
            op = msgspec.structs.replace(base, inputs=inputs)
            if nondet:
                # never shared, never reused: unique to this request, stable across a
                # planner restart so a replay does not run it twice
                salt = f"{run.salt}|nondet:{run.wf_id}:{name}:{'.'.join(map(str, pos))}"
                key = keys.op_key(op, salt)
            else:
                key = keyer(inputs)
            node.keys[pos] = key
            if table is not None:
                rows[key] = pos[0]
            in_flight_here = bool(self.waiters.get(key))
            waiter = Waiter(run, name, pos, inputs)
            self.waiters.setdefault(key, []).append(waiter)
            added.append((key, waiter))
            state = OpState(
                key=key,
                state="pending",
                spec=op,
                workflow_id=run.wf_id,
                tenant=run.spec.tenant,
                created_at=now,
            )
            wave.append((key, op, state, in_flight_here))
        # the revision tells incarnations of a key apart: once `flowmesh cache invalidate`
        # deleted an entry, the ready message of the new one is not a duplicate
        claims = await self._claim_many([(key, state) for key, _, state, _ in wave], run.wf_id)
        roles: list[RequestRole] = []
        counts: collections.Counter[str] = collections.Counter()
        for _, existing in claims:
            if existing is None or existing.workflow_id == run.wf_id:
                # ours (a create whose reply was lost in a nats restart, or a replayed
                # submission, reads back as ours, whatever its state now): recorded as
                # `ran`, with the wave's others (a record that exists already is kept)
                roles.append("ran")
            else:
                roles.append("joined" if existing.state == "pending" else "reused")
                node.status.reused += 1
            counted = roles[-1]
            if existing is not None and existing.state != "pending":
                counted = "reused"  # ours, committed already: asked for again
            counts[counted] += 1
        for role, n in counts.items():
            # one node, so one kind
            metrics.op_requested(base.kind, run.spec.tenant, role, n)
        # the wave's operators are one node's: one batch key, the shared spec once per
        # chunk, each operator's own part as an OpItem (no ReadyOp built and taken apart)
        ready: list[OpItem] = []
        finished: list[OpDone] = []
        for (key, op, state, in_flight_here), (revision, existing) in zip(
            wave, claims, strict=True
        ):
            if existing is not None:
                if existing.state != "pending":
                    finished.append(existing.to_done())
                    continue
                if in_flight_here:
                    continue  # in flight for another waiter here: its completion completes us
            # another workflow's pending entry (claimed by another shard, or before a
            # restart) goes out again under that workflow: the commit that wins keeps the
            # entry's `workflow_id`, the one whose request ran it (lineage and cost find
            # the `ran` requester of a key there, not in a per-key request record)
            owner = existing if existing is not None else state
            ready.append(
                OpItem(
                    key=key,
                    inputs=op.inputs,
                    workflow_id=owner.workflow_id,
                    tenant=owner.tenant,
                    max_attempts=self.max_attempts,
                    max_reclaims=self.max_reclaims,
                    revision=revision,
                    created_at=existing.created_at if existing is not None else state.created_at,
                    table=table,
                    row=rows.get(key, -1),
                    input_bytes=whole or int(per_input * len(op.inputs)),
                )
            )
        messages: list[tuple[str, Any, str | None]] = []
        if ready:
            subject = subjects.ready(node.kind.pool)
            # more of this node to come: one of its inputs is still being produced
            more = any(
                not run.nodes[i].upstream_complete or run.nodes[i].pending > 0 for i in node.inputs
            )
            chunks = [
                ReadyChunk(base, bkey, ready[i : i + READY_CHUNK], more)
                for i in range(0, len(ready), READY_CHUNK)
            ]
            messages = [(subject, c, _chunk_id(c)) for c in chunks]
        # the requests are recorded before the workflow can complete, so its lineage and
        # its share of the cost are there when it does: written beside the ready chunks
        # (one round trip's wait for both), and both are done before any completion of
        # this wave is handled
        await asyncio.gather(
            self._record_requests(run, name, [w[0] for w in wave], roles, now),
            self.bus.publish_many(messages),
        )
        if finished:
            await self.complete_keys(finished)

    async def _claim_many(
        self, claims: list[tuple[str, OpState]], wf_id: str
    ) -> list[tuple[int, OpState | None]]:
        """`_claim` for many keys: the creates go out pipelined; only a key that exists
        already (dedup, a replay, an invalidated entry) is looked at one by one."""
        created = await self.bus.kv_write_many(
            streams.KV_OPS, [(key, codec.encode(state), 0) for key, state in claims]
        )
        out: list[tuple[int, OpState | None]] = [(rev or 0, None) for rev in created]
        taken = [i for i, rev in enumerate(created) if rev is None]
        if taken:
            found = await asyncio.gather(
                *(self._claim(claims[i][0], claims[i][1], wf_id) for i in taken)
            )
            for i, got in zip(taken, found, strict=True):
                out[i] = got
        return out

    async def _claim(self, key: str, fresh: OpState, wf_id: str) -> tuple[int, OpState | None]:
        """Create the key's `pending` entry, or find what is there: (revision, None) when
        this request claimed it and must publish it, else (revision, the entry).

        A `failed` entry left by another workflow is claimed again (compare-and-set on
        its revision, so of several requests exactly one re-runs it): a failure, which
        may have been transient, is reported to the workflows that asked for it while
        it ran, never served from the cache to later ones. The workflow that created it
        gets it back (a planner replaying its submission must not run it again)."""
        for _ in range(8):
            try:
                created = await self.bus.retrying(
                    "create op", functools.partial(self.kv_ops.create, key, codec.encode(fresh))
                )
                return created, None
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.bus.retrying("read op", functools.partial(self.kv_ops.get, key))
            except KeyNotFoundError:
                continue  # invalidated between the two calls: create it again
            revision = entry.revision or 0
            existing = codec.decode(entry.value, OpState) if entry.value else None
            if existing is None:
                continue
            if existing.state != "failed" or existing.workflow_id == wf_id:
                return revision, existing
            try:
                updated = await self.bus.retrying(
                    "re-claim failed op",
                    functools.partial(self.kv_ops.update, key, codec.encode(fresh), last=revision),
                )
            except KeyWrongLastSequenceError:
                continue  # another request re-claimed it first: look again
            log.info("re-running a failed operator", key=key[:12], workflow=wf_id)
            return updated, None
        raise RuntimeError(f"operator {key[:12]}: its KV entry keeps changing")

    async def _record_requests(
        self, run: WorkflowRun, node: str, keys_: list[str], roles: list[RequestRole], at: float
    ) -> None:
        """The wave's requests: its `ran` ones as one RanRequests entry per READY_CHUNK
        operators, `joined` and `reused` one entry per key (rarer: dedup hits).

        Create, not put: after a planner restart the replayed request must not turn
        the original "ran" into "reused" (a refused create is that case: ignored). A
        replayed `ran` chunk has the same keys and revisions, so the same entry name."""
        # a dict, not a list: a membership test per key over a list of a wave's 2,048
        # was half a CPU-second of the engine's per 20,000 operators
        ran: dict[str, None] = {}
        writes: list[tuple[str, bytes, int]] = []
        for key, role in zip(keys_, roles, strict=True):
            if role == "ran":
                ran[key] = None  # the same record twice in one wave: one operator
                continue
            request = OpRequest(key, run.wf_id, run.spec.tenant, node, role, at)
            writes.append((f"{key}.{run.wf_id}", codec.encode(request), 0))
        ran_keys = list(ran)
        for i in range(0, len(ran_keys), READY_CHUNK):
            part = ran_keys[i : i + READY_CHUNK]
            entry = RanRequests(run.wf_id, run.spec.tenant, node, at, part)
            writes.append((f"{_ran_id(node, part)}.{run.wf_id}", codec.encode(entry), 0))
        await self.bus.kv_write_many(streams.KV_REQUESTS, writes)

    async def _op_spec(
        self, node: NodeSpec, kind: OperatorKind, inputs: list[str], adapter: str | None
    ) -> OpSpec:
        ex_id = executor_id(kind.name, node.fn)
        version = await self._resolve(streams.KV_EXECUTORS, ex_id)
        model = await self._resolve(streams.KV_MODELS, node.model) if node.model else None
        parsed = parse_params(kind, node.params)
        # built-in kinds: canonical params include defaults, so `{}` and the explicit
        # defaults are the same work
        params = parsed if isinstance(parsed, dict) else codec.to_builtins(parsed)
        return OpSpec(
            kind=kind.name,
            executor=ex_id,
            version=version,
            fanout=kind.fanout,
            params=params,
            model=model,
            inputs=inputs,
            adapter=adapter,
        )

    async def _resolve(self, bucket: str, name: str) -> str:
        """What workers advertised for `name` in `bucket` (a version or a model digest)."""
        kv = self.kv_exec if bucket == streams.KV_EXECUTORS else self.kv_models
        cache_key = (bucket, name)
        hit = self._resolved.get(cache_key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < 5.0 and hit[0] is not None:
            return hit[0]
        try:
            entry = await kv.get(name)
            value: str | None = entry.value.decode() if entry.value else None
        except (KeyNotFoundError, ValueError):
            value = None
        if value is None:
            raise Unresolved(name)
        self._resolved[cache_key] = (value, now)
        return value

    async def _op_state(self, key: str) -> OpState | None:
        try:
            entry = await self.kv_ops.get(key)
        except KeyNotFoundError:
            return None
        return codec.decode(entry.value, OpState) if entry.value else None
