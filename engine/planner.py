"""The planner: workflows in, ready operators out, completion recorded.

It consumes submissions, expands each node into record-level operators, keys them by
content, and publishes an operator the moment its inputs exist (data-flow triggering: a
record can be three nodes deep while its neighbours are still in the first). Completions
(`fm.op.done`) advance every workflow waiting on that key.

State is rebuilt, never persisted: on start the planner replays the submission stream;
each workflow that is not finished is expanded again, and every operator whose KV entry
already says `done` completes at once from the KV (the same path that serves completed
dedup). So a SIGKILL of the engine loses nothing: the KV and the streams are the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from flowmesh.engine import keys, metrics
from flowmesh.engine.shards import check_shard, done_consumer_name, shard_of
from flowmesh.engine.spec import SpecError, topo_order, validate
from flowmesh.engine.supervise import guarded
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.cas import CAS, CASError
from flowmesh.topics.messages import (
    CancelWorkflow,
    DoneBatch,
    NodeSpec,
    NodeStatus,
    OpDone,
    OpFailure,
    OpRequest,
    OpSpec,
    OpState,
    ReadyChunk,
    ReadyOp,
    RequestRole,
    SubmitWorkflow,
    WorkflowStatus,
    chunks_of,
)
from flowmesh.topics.operators import (
    KINDS,
    NONDETERMINISTIC,
    OperatorKind,
    executor_id,
    parse_params,
)
from flowmesh.topics.settings import env_int
from flowmesh.topics.transport import Consumer

log = structlog.get_logger("flowmesh.planner")

Pos = tuple[int, ...]

FANOUT_WINDOW = 2048  # operators a fan-out starts as one wave
READY_CHUNK = 256  # operators per ready message at most
# Submissions accepted at once: one tenant's huge fan-out (or a 60 s wait for an
# executor to appear) never delays another's acceptance; bounded, so a flood of
# submissions does not expand without limit.
ACCEPT_CONCURRENCY = 16


DEFAULT_MAX_ATTEMPTS = 3


def max_attempts_from_env() -> int:
    """Executions an operator may fail before it is committed `failed`
    ($FLOWMESH_MAX_ATTEMPTS, default 3; 1 turns retries off)."""
    return env_int("FLOWMESH_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, 1)


def _digests_of(records: list[dict[str, Any]]) -> list[str]:
    return [codec.digest_of(r) for r in records]


def _chunk_id(chunk: ReadyChunk) -> str:
    """The message id of a ready chunk: the same operators at the same revisions (a
    replayed submission) are dropped by the server as a duplicate."""
    return "ready-" + codec.digest_of([[it.key, it.revision] for it in chunk.items])


def _decode_quietly(data: bytes) -> SubmitWorkflow | None:
    if len(data) > streams.MAX_MESSAGE_BYTES:
        return None
    try:
        return codec.decode(data, SubmitWorkflow)
    except codec.DecodeError:
        return None


class Unresolved(Exception):
    """No live worker has advertised the executor or model an operator needs (yet)."""


@dataclass
class NodeRun:
    name: str
    spec: NodeSpec | None  # None for a source dataset
    kind: OperatorKind | None
    inputs: list[str]
    downstream: list[str] = field(default_factory=list)
    outputs: dict[Pos, list[str] | None] = field(default_factory=dict)  # slot -> records
    keys: dict[Pos, str] = field(default_factory=dict)  # slot -> operator key
    pending: int = 0
    upstream_complete: bool = False
    complete: bool = False
    manifest: str | None = None
    ordered: list[str] = field(default_factory=list)
    status: NodeStatus = field(default_factory=NodeStatus)
    # operators waiting for the node that trains this node's adapter
    deferred: list[tuple[Pos, list[str]]] = field(default_factory=list)
    adapter_digest: str | None = None
    # a source dataset whose records are read from its table, not stored one by one
    table: str | None = None


@dataclass
class WorkflowRun:
    wf_id: str
    spec: Any  # WorkflowSpec
    salt: str
    submitted_at: float
    nodes: dict[str, NodeRun]
    state: str = "running"
    error: str | None = None
    ended_at: float | None = None
    failure: OpFailure | None = None
    # operators done in the status a previous planner wrote: a replaying planner does not
    # write a lower count over it (progress never goes backwards)
    done_floor: int = 0

    def ops_done(self) -> int:
        return sum(n.status.done for n in self.nodes.values() if n.spec is not None)

    def to_status(self) -> WorkflowStatus:
        return WorkflowStatus(
            workflow_id=self.wf_id,
            name=self.spec.name,
            tenant=self.spec.tenant,
            state=self.state,  # type: ignore[arg-type]
            submitted_at=self.submitted_at,
            updated_at=time.time(),
            nodes={n.name: n.status for n in self.nodes.values() if n.spec is not None},
            error=self.error,
            ended_at=self.ended_at,
            datasets={
                n.name: n.manifest for n in self.nodes.values() if n.spec is None and n.manifest
            },
            dedup_scope=self.spec.dedup_scope,
            tables={name: ds.digest for name, ds in self.spec.datasets.items() if ds.digest},
            failure=self.failure,
        )


@dataclass
class Waiter:
    run: WorkflowRun
    node: str
    pos: Pos


@dataclass
class Parked:
    run: WorkflowRun
    node: str
    pos: Pos
    inputs: list[str]
    since: float


class Planner:
    def __init__(
        self,
        bus: Bus,
        cas: CAS,
        *,
        resolve_wait_s: float = 60.0,
        status_interval_s: float = 0.25,
        max_attempts: int | None = None,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        check_shard(shard, shards)
        self.shard = shard
        self.shards = shards  # this planner plans the workflows whose id hashes to shard
        self.bus = bus
        self.cas = cas
        self.resolve_wait_s = resolve_wait_s
        self.max_attempts = max_attempts or max_attempts_from_env()
        # the stream sequence of the last submission taken in, and those taken in but
        # not yet handled: a re-created submissions consumer resumes after the last one
        # below which everything was handled (_resume_seq)
        self._submit_seq = 0
        self._unhandled: set[int] = set()
        self._accepts: dict[int, asyncio.Task[None]] = {}  # stream seq -> its handling
        self._accept_slots = asyncio.Semaphore(ACCEPT_CONCURRENCY)
        self._accept_error: Exception | None = None
        self._accepting: set[str] = set()  # workflow ids being accepted now
        self.status_interval_s = status_interval_s
        self.runs: dict[str, WorkflowRun] = {}
        self.waiters: dict[str, list[Waiter]] = {}
        self.parked: list[Parked] = []
        self._dirty: set[str] = set()
        self._resolved: dict[tuple[str, str], tuple[str | None, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._cancel_sub: Any = None  # fm.wf.cancel (core NATS; none on Kafka)

    # --- lifecycle ------------------------------------------------------------------

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
        if self.bus.kafka is None:
            self._cancel_sub = await self.bus.nc.subscribe(subjects.CANCEL, cb=self._on_cancel)

    async def stop(self) -> None:
        self._stopping.set()
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await self._cancel_sub.unsubscribe()
        accepts = list(self._accepts.values())
        for t in [*self._tasks, *accepts]:
            t.cancel()
        await asyncio.gather(*self._tasks, *accepts, return_exceptions=True)
        await self._flush_status()

    async def _on_cancel(self, msg: Any) -> None:
        """Stop a running workflow of this shard: no operator of it starts any more, its
        waiters go, and its status says `cancelled` (a replay skips it from then on)."""
        try:
            req = codec.decode(msg.data, CancelWorkflow)
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

    # --- submissions ----------------------------------------------------------------

    async def _submissions_loop(self) -> None:
        if self.bus.kafka is not None:
            await self._kafka_submissions_loop()
            return
        # An ordered consumer from the first message: replaying every submission is how
        # a restarted planner finds the workflows still running. It lives in the
        # server's memory, so a nats restart kills it: after a reconnect it is made
        # again from the next sequence (nats-py would only notice after two missed
        # idle heartbeats, and its own re-creation is not retried if that one fails).
        while not self._stopping.is_set():
            reconnects = self.bus.reconnects
            if resume := self._resume_seq():
                sub = await self.bus.js.subscribe(
                    subjects.SUBMIT,
                    ordered_consumer=True,
                    config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=resume + 1,
                    ),
                )
            else:
                sub = await self.bus.js.subscribe(
                    subjects.SUBMIT, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
                )
            try:
                while self.bus.reconnects == reconnects and not self._stopping.is_set():
                    self._raise_accept_error()
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except TimeoutError:
                        continue
                    await self._take_in(msg.metadata.sequence.stream, msg.subject, msg.data)
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

    async def _kafka_submissions_loop(self) -> None:
        # The same replay on Kafka: the submit topic from its first offset, in no group
        # (every planner start reads all of it); aiokafka reconnects by itself.
        assert self.bus.kafka is not None
        sub = await self.bus.kafka.consumer([subjects.SUBMIT], group=None)
        try:
            while not self._stopping.is_set():
                self._raise_accept_error()
                try:
                    msgs = await sub.fetch(64, timeout=1.0)
                except TimeoutError:
                    continue
                for msg in msgs:
                    # side by side as on NATS (offsets count from 0, sequences from 1)
                    await self._take_in(msg.offset + 1, msg.subject, msg.data)
        finally:
            await sub.unsubscribe()

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
        metrics.workflow_submitted(sub.spec.tenant)
        metrics.workflows_running(len(self.runs))
        for name, ds in sub.spec.datasets.items():
            try:
                if ds.digest is None:
                    raise CASError("dataset was not uploaded (no digest)")
                records = await self.cas.get_table(ds.digest)
                node = run.nodes[name]
                if self._whole_readers(run, name):
                    # an operator reads the whole dataset: its records as blobs
                    digests = await self.cas.put_records(records)  # off the event loop
                else:
                    # only record operators read it: each reads its row from the table
                    # (table digest, row), so the data is not stored a second time, one
                    # blob per record; their keys still cover each record's content
                    digests = await asyncio.to_thread(_digests_of, records)
                    node.table = ds.digest
                # the manifest first: the status names the source data even if the run
                # fails while it fans out
                manifest = await self.cas.put_manifest(digests)
            except CASError as exc:  # a full disk too: the workflow fails, and says so
                await self._fail(run, f"dataset {name!r}: {exc}")
                return
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

    # --- expansion ------------------------------------------------------------------

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
        ready chunks (one message per READY_CHUNK operators, the spec once)."""
        if run.state != "running" or not starts:
            return
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
        now = time.time()
        wave: list[tuple[str, OpSpec, OpState, bool]] = []
        rows: dict[str, int] = {}
        for pos, inputs in starts:
            op = msgspec.structs.replace(base, inputs=inputs)
            salt = run.salt
            if nondet:
                # never shared, never reused: unique to this request, stable across a
                # planner restart so a replay does not run it twice
                salt = f"{salt}|nondet:{run.wf_id}:{name}:{'.'.join(map(str, pos))}"
            key = keys.op_key(op, salt)
            node.keys[pos] = key
            if table is not None:
                rows[key] = pos[0]
            in_flight_here = bool(self.waiters.get(key))
            self.waiters.setdefault(key, []).append(Waiter(run, name, pos))
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
        for (_key, op, _, _), (_, existing) in zip(wave, claims, strict=True):
            if existing is None or (
                existing.state == "pending" and existing.workflow_id == run.wf_id
            ):
                # ours (a create whose reply was lost in a nats restart reads back as ours)
                roles.append("ran")
            else:
                roles.append("joined" if existing.state == "pending" else "reused")
                if existing.workflow_id != run.wf_id:
                    node.status.reused += 1
            metrics.op_requested(op.kind, run.spec.tenant, roles[-1])
        ready: list[ReadyOp] = []
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
            ready.append(
                ReadyOp(
                    key=key,
                    spec=op,
                    batch_key=bkey,
                    workflow_id=run.wf_id,
                    tenant=run.spec.tenant,
                    max_attempts=self.max_attempts,
                    revision=revision,
                    created_at=existing.created_at if existing is not None else state.created_at,
                    table=table,
                    row=rows.get(key, -1),
                )
            )
        messages: list[tuple[str, Any, str | None]] = []
        if ready:
            subject = subjects.ready(node.kind.pool)
            # more of this node to come: one of its inputs is still being produced
            more = any(
                not run.nodes[i].upstream_complete or run.nodes[i].pending > 0 for i in node.inputs
            )
            chunks = chunks_of(ready, READY_CHUNK, more)
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
        # create, not put: after a planner restart the replayed request must not turn
        # the original "ran" into "reused" (a refused create is that case: ignored)
        writes = [
            (
                f"{key}.{run.wf_id}",
                codec.encode(OpRequest(key, run.wf_id, run.spec.tenant, node, role, at)),
                0,
            )
            for key, role in zip(keys_, roles, strict=True)
        ]
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

    # --- completions ----------------------------------------------------------------

    async def _done_loop(self) -> None:
        psub: Consumer
        # one durable consumer per shard: every shard sees every completion
        name = done_consumer_name(self.shard, self.shards)
        if self.bus.kafka is not None:  # a committed offset in the shard's group
            psub = await self.bus.kafka.consumer([subjects.DONE], name)
        else:
            psub = await self.bus.js.pull_subscribe(
                subjects.DONE,
                durable=name,
                stream=streams.STREAM_DONE,
                config=dataclasses.replace(streams.planner_done_consumer(), durable_name=name),
            )
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
            await self.complete_keys(dones)
            for msg in msgs:
                with contextlib.suppress(Exception):  # a lost ack: redelivered, a no-op
                    await msg.ack()

    async def complete_key(self, done: OpDone) -> None:
        await self.complete_keys([done])

    async def complete_keys(self, dones: list[OpDone]) -> None:
        """Completions in: every workflow waiting on them advances, and the operators
        they make ready start as one wave per node."""
        got = [(done, self.waiters.pop(done.key, [])) for done in dones]
        got = [(done, waiters) for done, waiters in got if waiters]
        if not got:
            return
        outputs = await asyncio.gather(*(self._outputs_of(done) for done, _ in got))
        # successes first: a wave that also fails the workflow still counts what it
        # completed (the status says how far the workflow got)
        order = sorted(range(len(got)), key=lambda i: outputs[i][0].status == "failed")
        got = [got[i] for i in order]
        outputs = [outputs[i] for i in order]
        # per (workflow, node): the operators its completed slots feed, counted at once
        new: dict[tuple[str, str], tuple[WorkflowRun, dict[str, list[tuple[Pos, list[str]]]]]] = {}
        for (done, waiters), (status_done, outs) in zip(got, outputs, strict=True):
            for w in waiters:
                if w.run.state != "running":
                    continue
                node = w.run.nodes[w.node]
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
                node.pending -= 1
                node.status.done += 1
                self._dirty.add(w.run.wf_id)
                children = new.setdefault((w.run.wf_id, w.node), (w.run, {}))[1]
                for child, starts in self._count_children(w.run, w.node, [(w.pos, outs)]).items():
                    children.setdefault(child, []).extend(starts)
        for (_, name), (run, children) in new.items():
            await self._start_children(run, children)
            await self._maybe_complete(run, name)

    async def _outputs_of(self, done: OpDone) -> tuple[OpDone, list[str]]:
        """The completion (turned `failed` if its result is unreadable) and its output
        record digests: inline, or read from its manifest."""
        if done.status != "done":
            return done, []
        if done.outputs is not None:
            return done, list(done.outputs)
        if not done.output:
            return done, []
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
            await self._write_status(run)
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
        self._dirty.add(run.wf_id)  # the status loop writes it if this write fails
        await self._write_status(run)
        log.warning("workflow failed", workflow=run.wf_id, error=error)

    # --- background -----------------------------------------------------------------

    async def _parked_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(0.5)
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
