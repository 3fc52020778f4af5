"""The worker runtime: stateless, idempotent, safe to kill at any instant.

Loop: fetch one assignment from `fm.assign.<me>`; for each operator skip it if its KV
entry is already final; fetch inputs from the CAS; run the executor on the whole batch in
a thread (in-progress acks keep the assignment ours meanwhile); write results to the CAS;
commit each operator with compare-and-set on its KV entry; publish completions; only then
ack. A kill anywhere before the ack leaves the assignment unacked and the scheduler
replays it elsewhere; a replay finds the committed entry and changes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.bus.transport import Consumer, Stop
from flowmesh.topics.messages import (
    Assignment,
    CancelWorkflow,
    DoneBatch,
    OpDone,
    OpState,
    ReadyOp,
    WorkerInfo,
    chunks_of,
)
from flowmesh.topics.operators import KINDS, pool_of
from flowmesh.topics.store.cas import CAS, CASError
from flowmesh.topics.telemetry import logs
from flowmesh.workers import billing, metrics
from flowmesh.workers.executors.base import (
    CANCELLED,
    MAX_CANCELLED_KEPT,
    OP_WALL_S,
    Executor,
    OpError,
    OpInput,
    OpTimeout,
    Outcome,
    Watch,
    cancel_keys,
    check_output,
    uncancel_keys,
    wall_limit_error,
    watched,
)
from flowmesh.workers.models.adapters import store_artifacts

log = structlog.get_logger("flowmesh.worker")

INLINE_OUTPUTS = 256  # completions list output digests inline up to this many
# A batch's completions go out as few messages as fit this size each (a failed
# operator's traceback is up to 4 kB, inline outputs up to 256 digests).
DONE_MESSAGE_BYTES = 256 * 1024
TABLES_KEPT = 4  # source tables a worker keeps decoded for the rows it reads
# An operator whose worker was lost (killed, crashed, out of memory, reclaimed) while it
# ran is replayed: that is preemption, not its fault. But a record that crashes every
# process that runs it would take the fleet down one worker at a time, forever. After
# ISOLATE_AFTER losses a batch's operators go back to the ready pool one per batch, so
# the innocent ones of a batch get through; after its `max_reclaims` losses (the planner
# sets it on each operator, $FLOWMESH_MAX_RECLAIMS on the engine, default 6) an operator
# is failed without running again.
ISOLATE_AFTER = 2
# An idle worker asks the server whether its assignment consumer still exists this
# often: a consumer deleted while nothing was fetched (a reclaim after a pause) shows
# only as fetches that time out, the same as no work.
CONSUMER_CHECK_S = 5.0
REJOIN_MAX_DELAY_S = 5.0
# Every operator has a wall-time limit (OP_WALL_S). The executor runs in a thread of its
# own; the event loop (heartbeats, in-progress acks) looks at its watch this often, and
# past the limit raises OpTimeout in that thread. Code blocked in C (a sleep, a socket)
# sees it only when it returns: ABANDON_AFTER_S past the limit the worker stops waiting,
# fails the batch's operators and goes on; the thread runs on, unwatched, until it ends.
# An abandoned thread that holds a model (generate, embed, score, train) could still be
# using it when the next batch does, and each one left running holds memory and CPU: the
# worker then finishes the batch in hand and exits, for its supervisor (flowmesh up,
# Kubernetes) to start it afresh.
WATCH_POLL_S = 0.25
ABANDON_AFTER_S = float(os.environ.get("FLOWMESH_OP_ABANDON_S", "30"))
MAX_ABANDONED = 4  # threads left running at once before the worker restarts


def losses(op: ReadyOp) -> int:
    """Deliveries of this operator that ended with its worker gone: every attempt
    that was not one of its own (retried) failures."""
    return op.attempt - op.failures


@dataclass(frozen=True)
class Todo:
    op: ReadyOp
    revision: int  # KV revision of its pending entry (0: no entry)
    pending: OpState | None


@dataclass
class Prepared:
    """An assignment with everything it needs loaded, ready to run."""

    msg: Any
    batch: Assignment
    keeper: asyncio.Task[None]  # in-progress acks until it is acked
    done: list[OpDone] = field(default_factory=list)  # already committed earlier
    todo: list[Todo] = field(default_factory=list)
    executor: Executor | None = None
    error: OpError | None = None
    inputs: list[OpInput] = field(default_factory=list)
    model: Any = None
    # failed operators with attempts left (or split off to run alone), republished as
    # ready instead of committed: (op, msg id part)
    retries: list[tuple[ReadyOp, str]] = field(default_factory=list)
    # the heartbeat that says this batch is running, sent while it was prepared (it
    # came to an idle worker, so it runs next): True once the server has it
    said: asyncio.Task[bool] | None = None


@dataclass
class WorkerConfig:
    device_class: str = "cpu"
    price_per_hour: float = 0.05
    watts: float = 65.0  # busy power of this device class, for energy attribution
    memory_gb: float = 8.0
    slots: int = 2
    heartbeat_s: float = 1.0
    stop_grace_s: float = 20.0
    generate_backend: Literal["auto", "hf", "vllm"] = "auto"
    model_dir: Path = field(default_factory=lambda: Path(".flowmesh/models"))
    models: list[str] = field(default_factory=lambda: ["tiny-llama"])
    plugins: list[str] = field(default_factory=list)
    worker_id: str | None = None


class Worker:
    def __init__(self, bus: Bus, cas: CAS, config: WorkerConfig) -> None:
        self.bus = bus
        self.cas = cas
        self.config = config
        self._stop_cancels: Stop | None = None
        self.id = config.worker_id or f"{config.device_class}-{uuid.uuid4().hex[:10]}"
        subjects.check_token(self.id, "worker id")
        self.executors: dict[str, Executor] = {}
        self.versions: dict[str, str] = {}  # executor id -> version, fixed at start
        self.model_digests: dict[str, str] = {}
        self.model_gb: dict[str, float] = {}  # weights digest -> size, announced
        self.batches_done = 0
        # kind, size, seconds, model digest of the last batch run
        self.last_batch: tuple[str, int, float, str] = ("", 0, 0.0, "")
        self.ops_executed = 0
        self._warmed: set[tuple[str, str, str]] = set()  # (executor, model, adapter) run once
        self.rates = billing.StandardRates()  # what an operator of each is billed
        self.started_at = time.time()
        self.running_batch = ""  # the batch executing now, announced in heartbeats
        self._in_hand = False  # a batch is being run or finished (the next one waits)
        self._running: list[Todo] = []  # its operators
        # workflows cancelled lately (fm.wf.cancel): their queued operators are not run
        self.cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tables: dict[str, list[dict[str, Any]]] = {}  # source tables, oldest first
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # False while we have no assignment consumer: no heartbeats then, so the
        # scheduler sends us nothing and reclaims what it sent (it goes elsewhere)
        self.joined = True
        self.rejoins = 0  # consumers re-created after losing ours
        self.abandoned = 0  # executor threads given up on past the wall-time limit
        self._abandoned: list[threading.Thread] = []
        self.restart_reason = ""  # set: the worker exits after the batch in hand
        self._consumer_checked = time.monotonic()

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        from flowmesh.workers.executors import builtin_executors
        from flowmesh.workers.models import ModelCache

        self.executors = builtin_executors(self.config.plugins, self.config.generate_backend)
        # an executor's version hashes its source (inspect.getsource: milliseconds per
        # executor); once per process, not on every heartbeat and batch, where it took
        # a third of a worker's time on no-op operators (loadgen overhead --profile)
        self.versions = {ex.id: ex.version for ex in self.executors.values()}
        self.models = ModelCache(self.cas, self.config.model_dir)
        for source in self.config.models:
            name, digest = await self._publish_model(source)
            self.model_digests[name] = digest
        # what each of its models weighs (files fetched under model_dir/<digest>/): read
        # once here, not on every heartbeat; the scheduler packs memory by it
        self.model_gb = {
            d: sum(f.stat().st_size for f in mdir.iterdir() if f.is_file()) / 1e9
            for d in self.model_digests.values()
            if (mdir := Path(self.config.model_dir) / d).is_dir()
        }
        self.kv_ops = await self.bus.kv(streams.KV_OPS)
        self.kv_workers = await self.bus.kv(streams.KV_WORKERS)
        kv_exec = await self.bus.kv(streams.KV_EXECUTORS)
        for ex in self.executors.values():
            await kv_exec.put(ex.id, self.versions[ex.id].encode())
            signature = getattr(ex, "signature", None)
            if signature is not None:
                # a transform's typed parameters: submissions are checked against them
                await kv_exec.put(streams.SIGNATURE_PREFIX + ex.id, codec.encode(signature))
        kv_models = await self.bus.kv(streams.KV_MODELS)
        for name, digest in self.model_digests.items():
            await kv_models.put(name, digest.encode())
        # acked only after results are committed and completions published: a kill
        # before that replays the assignment
        self.psub: Consumer = await self._subscribe_assignments()
        self._stop_cancels = await self.bus.transport.listen(subjects.CANCEL, self._on_cancel)
        await self.heartbeat()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._work_loop()),
        ]
        log.info(
            "worker started",
            worker=self.id,
            device_class=self.config.device_class,
            executors=len(self.executors),
            models=self.model_digests,
            bus=self.bus.transport.name,
        )

    async def _on_cancel(self, data: bytes) -> None:
        try:
            wf = codec.decode(data, CancelWorkflow).workflow_id
        except codec.DecodeError:
            return
        self.cancelled[wf] = None
        while len(self.cancelled) > MAX_CANCELLED_KEPT:
            self.cancelled.popitem(last=False)
        # the batch in hand stops before its next operator of that workflow
        cancel_keys(t.op.key for t in self._running if t.op.workflow_id == wf)

    async def _publish_model(self, source: str) -> tuple[str, str]:
        """Put the model a source names into the CAS: (advertised name, digest).
        Sources: tiny-llama, smollm2-135m, all-minilm-l6-v2, hf:/abs/path, ALIAS=SOURCE."""
        from flowmesh.workers.models import publish_source

        return await publish_source(self.cas, source, self.config.model_dir)

    async def run_until_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Graceful: finish the batch in hand, then leave so queued work is reclaimed."""
        self._stopping.set()
        with contextlib.suppress(Exception):
            await self.heartbeat(stopping=True)
        if self._tasks:
            # the work loop checks _stopping between batches; give the one in hand time
            # to commit, then cancel (an unfinished batch is unacked and gets replayed)
            await asyncio.wait(self._tasks[1:], timeout=self.config.stop_grace_s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stop_cancels is not None:
            await self._stop_cancels()
        with contextlib.suppress(Exception):
            await self.kv_workers.delete(self.id)

    async def heartbeat(self, stopping: bool = False) -> None:
        if not self.joined and not stopping:
            return
        info = WorkerInfo(
            worker=self.id,
            device_class=self.config.device_class,
            pools=sorted({KINDS[ex.kind].pool for ex in self.executors.values()}),
            executors=dict(self.versions),
            max_batch={ex.id: ex.max_batch for ex in self.executors.values()},
            models=dict(self.model_digests),
            resident=self.models.resident(),
            price_per_hour=self.config.price_per_hour,
            watts=self.config.watts,
            memory_gb=self.config.memory_gb,
            slots=self.config.slots,
            batches_done=self.batches_done,
            started_at=self.started_at,
            sent_at=time.time(),
            stopping=stopping,
            last_batch_kind=self.last_batch[0],
            last_batch_size=self.last_batch[1],
            last_batch_seconds=self.last_batch[2],
            last_batch_model=self.last_batch[3],
            running=self.running_batch,
            model_gb=dict(self.model_gb),
        )
        metrics.resident_models(len(info.resident))
        await self.kv_workers.put(self.id, codec.encode(info))

    async def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self.heartbeat()
            except Exception as exc:  # a nats restart: keep beating once it is back
                log.warning("heartbeat failed", worker=self.id, error=str(exc))

    # --- work -----------------------------------------------------------------------

    async def _work_loop(self) -> None:
        # Data movement decoupled from compute (as in DataFlower): while one batch runs
        # in the executor thread, the next assignment is fetched and its inputs and model
        # are loaded, so the device does not wait on the CAS between batches.
        upcoming: asyncio.Task[Prepared | None] | None = None
        try:
            while not self._stopping.is_set():
                if upcoming is None:
                    upcoming = asyncio.create_task(self._fetch_and_prepare())
                current = await upcoming
                upcoming = None
                if current is None:
                    continue
                self._in_hand = True
                if not self._stopping.is_set():
                    upcoming = asyncio.create_task(self._fetch_and_prepare())
                with logs.bound(worker=self.id, **logs.assignment_ids(current.batch)):
                    try:
                        await self._finish(current)
                    finally:
                        self._in_hand = False
                if self.restart_reason:
                    log.error("worker exiting to be restarted", worker=self.id,
                              reason=self.restart_reason)  # fmt: skip
                    self._stopping.set()
                    break
        finally:
            if upcoming is not None:
                upcoming.cancel()

    async def _fetch_and_prepare(self) -> Prepared | None:
        try:
            msgs = await self.psub.fetch(1, timeout=1.0)
        except TimeoutError:
            # no work, or no consumer: every CONSUMER_CHECK_S of idling, ask
            if time.monotonic() - self._consumer_checked > CONSUMER_CHECK_S:
                self._consumer_checked = time.monotonic()
                if await self._consumer_gone():
                    await self._rejoin()
            return None
        except Exception as exc:
            # a fetch from a deleted consumer fails like one during a nats restart (no
            # responders): ask the server which it is
            log.warning("fetch failed", worker=self.id, error=repr(exc))
            await asyncio.sleep(0.5)
            if await self._consumer_gone():
                await self._rejoin()
            return None
        self._consumer_checked = time.monotonic()
        return await self._prepare(msgs[0]) if msgs else None

    async def _consumer_gone(self) -> bool:
        return await self.bus.transport.assignment_consumer_gone(self.id)

    async def _subscribe_assignments(self) -> Consumer:
        """Our consumer of fm.assign.<id> (created if it does not exist)."""
        return await self.bus.transport.assignment_consumer(self.id, self.config.slots)

    async def _rejoin(self) -> None:
        """Our consumer was deleted: the scheduler took us for dead (SIGSTOP, a long
        pause, a partition) and reclaimed what we held, which now runs elsewhere. We are
        alive, so we take new work under a fresh consumer; a late commit of the old work
        changes nothing (compare-and-set)."""
        log.warning("assignment consumer gone; rejoining", worker=self.id)
        # silent until we have a consumer again: work sent meanwhile would only wait
        self.joined = False
        with contextlib.suppress(Exception):
            await self.psub.unsubscribe()
        delay = 0.2
        while not self._stopping.is_set():
            try:
                self.psub = await self._subscribe_assignments()
                break
            except Exception as exc:
                # e.g. an older scheduler still reading our assignments back through
                # its own consumer (err 10100): until it is gone, again
                log.warning(
                    "rejoin failed; will retry", worker=self.id, error=repr(exc), delay_s=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, REJOIN_MAX_DELAY_S)
        else:
            return
        self.joined = True
        self.rejoins += 1
        self._consumer_checked = time.monotonic()
        log.info("rejoined", worker=self.id, rejoins=self.rejoins)
        with contextlib.suppress(Exception):
            await self.heartbeat()

    async def _prepare(self, msg: Any) -> Prepared | None:
        batch = await self.bus.decode_or_dead_letter("worker", msg.subject, msg.data, Assignment)
        if batch is None:
            await msg.term()
            return None
        keeper = asyncio.create_task(self._keep_claimed(msg))
        prepared = Prepared(msg=msg, batch=batch, keeper=keeper)
        if not self._in_hand:
            # nothing runs before it: said now, while its inputs are read, instead of
            # one more round trip between reading them and running it
            self.running_batch = batch.batch_id
            prepared.said = asyncio.create_task(self._say_running())
        try:
            ops = batch.ops
            # an operator whose claim revision came with it is not read first: its
            # commit is a compare-and-set on that revision, which finds out the same
            # (a replay of a committed one then runs again and loses its commit);
            # the others are read concurrently, one round trip's wait for the batch
            unknown = [op for op in ops if not op.revision]
            states = await asyncio.gather(
                *(
                    self.bus.retrying("read op state", functools.partial(self._state, op.key))
                    for op in unknown
                )
            )
            read = dict(zip((op.key for op in unknown), states, strict=True))
            for op in ops:
                if op.key not in read:
                    prepared.todo.append(Todo(op, op.revision, None))
                    continue
                state, revision = read[op.key]
                if state is not None and state.state != "pending":
                    prepared.done.append(state.to_done())  # committed by an earlier attempt
                else:
                    prepared.todo.append(Todo(op, revision, state))
            if prepared.todo:
                spec0 = prepared.todo[0].op.spec
                executor = self.executors.get(spec0.executor)
                if executor is None or self.versions.get(spec0.executor) != spec0.version:
                    prepared.error = OpError(
                        f"worker {self.id} has no executor {spec0.executor}@{spec0.version}"
                    )
                else:
                    prepared.executor = executor
                    prepared.inputs = [await self._inputs(t.op) for t in prepared.todo]
                    if spec0.model:
                        try:
                            prepared.model = await self.models.get(spec0.model, spec0.adapter)
                        except (ValueError, CASError) as exc:
                            # a digest that names no model, or an adapter made for
                            # another base: retrying cannot help, the batch fails
                            prepared.executor = None
                            prepared.error = OpError(f"cannot load the model: {exc}")
        except Exception as exc:
            # infrastructure trouble (nats/CAS): leave it for redelivery
            log.exception("batch preparation failed; it will be retried", error=str(exc))
            keeper.cancel()
            self._not_running(batch)
            await self._nak(msg)
            return None
        return prepared

    async def _say_running(self) -> bool:
        """A heartbeat naming `running_batch`; whether the server has it."""
        try:
            await self.heartbeat()
        except Exception:
            return False
        return True

    def _not_running(self, batch: Assignment) -> None:
        """`batch` was said to run and does not (or no longer): the next heartbeat says so."""
        if self.running_batch == batch.batch_id:
            self.running_batch = ""

    async def _nak(self, msg: Any) -> None:
        """Hand an assignment back for redelivery; through an outage, once the link is
        back (else the server redelivers it anyway after its ack wait)."""
        with contextlib.suppress(Exception):
            await self.bus.retrying("nak", lambda: msg.nak(delay=1.0), retry_s=20.0)

    async def _finish(self, p: Prepared) -> None:
        try:
            if p.todo:
                p.done.extend(await self._execute(p))
            # ended_at tells commits of one key apart (it runs again after an
            # invalidation); a replay of the same commit keeps its id: a duplicate.
            # Retries go out before the ack too: a kill in between replays the batch,
            # and the retry's msg id makes its second publish a duplicate.
            await self.bus.publish_many(
                done_messages(p.batch.batch_id, p.done) + ready_messages(p.retries)
            )
        except Exception as exc:
            # infrastructure trouble: leave the assignment unacked so it is redelivered;
            # the compare-and-set commit makes the retry safe
            log.exception("batch failed; it will be retried", worker=self.id, error=str(exc))
            p.keeper.cancel()
            await self._nak(p.msg)
            return
        finally:
            p.keeper.cancel()
            self._not_running(p.batch)
        try:
            await p.msg.ack()
        except Exception as exc:
            # unacked, it is redelivered after the ack wait and finds every key final
            log.warning("ack failed", worker=self.id, error=repr(exc))
            return
        self.batches_done += 1
        with contextlib.suppress(Exception):
            await self.heartbeat()  # tell the scheduler at once that a slot is free

    async def _keep_claimed(self, msg: Any) -> None:
        while True:
            await asyncio.sleep(streams.ASSIGN_ACK_WAIT_S / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _execute(self, p: Prepared) -> list[OpDone]:
        lost = [t for t in p.todo if losses(t.op) >= t.op.max_reclaims]
        if lost:
            p.todo = [t for t in p.todo if losses(t.op) < t.op.max_reclaims]
            now = time.time()
            p.done.extend(
                await self._commit_all(
                    [(t, self._lost_error(t), now, now, 0.0, 1, 0.0) for t in lost]
                )
            )
        dropped = [t for t in p.todo if t.op.workflow_id in self.cancelled]
        if dropped:
            # committed failed, not run: a later request of the same work claims it again
            p.todo = [t for t in p.todo if t.op.workflow_id not in self.cancelled]
            now = time.time()
            p.done.extend(
                await self._commit_all(
                    [(t, OpError(CANCELLED), now, now, 0.0, 1, 0.0) for t in dropped]
                )
            )
        if not p.todo:
            return []
        if len(p.todo) > 1 and max(losses(t.op) for t in p.todo) >= ISOLATE_AFTER:
            # not run here: each operator goes back to the ready pool as a batch of its
            # own (a batch key no other operator has), so a record that kills its worker
            # takes only itself down and its batch-mates run elsewhere
            log.warning(
                "splitting a batch that lost its worker before",
                worker=self.id,
                ops=len(p.todo),
                losses=max(losses(t.op) for t in p.todo),
            )
            p.retries.extend(self._alone(t) for t in p.todo)
            return []
        return await self._execute_batch(p)

    def _alone(self, t: Todo) -> tuple[ReadyOp, str]:
        op = t.op
        alone = msgspec.structs.replace(op, batch_key=f"{op.batch_key}|alone|{op.key}")
        return alone, f"alone-{op.key}-{t.revision}-{op.attempt}"

    def _lost_error(self, t: Todo) -> OpError:
        return OpError(
            f"its worker was lost {losses(t.op)} times while running it (killed, crashed or "
            f"out of memory; max_reclaims={t.op.max_reclaims}): not run again"
        )

    async def _execute_batch(self, p: Prepared) -> list[OpDone]:
        # said before it runs: if this process dies now, the scheduler counts a loss
        # for this batch's operators only, not for those queued behind it
        self.running_batch = p.batch.batch_id
        self._running = p.todo
        # awaited: a record that kills the process (os._exit in its executor) must
        # find this said first, or its loss is not counted and it crash-loops the fleet
        if p.said is None or not await p.said:
            with contextlib.suppress(Exception):
                await self.heartbeat()
        try:
            return await self._run_and_commit(p)
        finally:
            self.running_batch = ""
            self._running = []
            uncancel_keys(t.op.key for t in p.todo)

    async def _run_and_commit(self, p: Prepared) -> list[OpDone]:
        warmup_s = 0.0
        started = time.time()
        cpu0 = time.process_time()
        todo = p.todo
        spec0 = todo[0].op.spec
        outcomes: list[Outcome]
        if p.executor is None:
            outcomes = [p.error or OpError("no executor") for _ in todo]
        else:
            try:
                # a warm-up that fails or runs past the limit is the batch's outcome:
                # it is not run a second time
                warmup_s = await self._warm_up(p)
                started, cpu0 = time.time(), time.process_time()
                outcomes = await self._run_watched(p.executor, p.inputs, p.model)
            except OpTimeout:
                # a batch run as one (generate, embed, score, train) ran past the limit
                outcomes = [wall_limit_error(OP_WALL_S, p.executor.id) for _ in todo]
            except Exception as exc:
                # the executor failed as a whole: every op of the batch fails with it
                outcomes = [_batch_error(exc) for _ in todo]
            if len(outcomes) != len(todo):
                n = len(outcomes)
                outcomes = [OpError(f"{p.executor.id} returned {n} results")] * len(todo)
            # every executor's output within the limits, whichever runs it
            outcomes = [_bounded(t.op.key, o) for t, o in zip(todo, outcomes, strict=True)]
            self.ops_executed += len(todo)
        ended = time.time()
        measured, _ = billing.split(
            ended - started, time.process_time() - cpu0, 0.0, not billing.gpu_in_use()
        )
        key = (spec0.executor, spec0.model or "", spec0.adapter or "")
        failed = any(isinstance(o, OpError) for o in outcomes)
        # a batch with failures pays what it took and does not set the rate
        share = measured / len(todo) if failed else self.rates.bill(key, len(todo), measured)
        overhead = (ended - started + warmup_s) / len(todo) - share
        self.last_batch = (spec0.kind, len(todo), ended - started, spec0.model or "")
        metrics.batch_ran(spec0.kind, self.config.device_class, len(todo), ended - started)
        # each operator is charged the standard rate of its work (workers/billing.py) at
        # this device class's price and power; the rest of the time the batch took
        # (warm-up, waiting for a core, the machine's variance) is the fleet's overhead
        commits = []
        for t, outcome in zip(todo, outcomes, strict=True):
            cancelled = isinstance(outcome, OpError) and str(outcome) == CANCELLED
            if (
                isinstance(outcome, OpError)
                and not cancelled
                and not outcome.permanent
                and t.op.failures + 1 < t.op.max_attempts
            ):
                p.retries.append(self._retry(t, outcome))
                continue
            commits.append((t, outcome, started, ended, share, len(todo), overhead))
        return await self._commit_all(commits)

    async def _warm_up(self, p: Prepared) -> float:
        """The first batch of an inference model on this worker: the executor runs it
        once first, unbilled (workers/billing.py); the seconds it took. One input is not
        enough: the first batch of a size still paid 2.4x its warm time after it."""
        spec = p.todo[0].op.spec if p.todo else None
        if p.executor is None or spec is None or spec.kind not in billing.WARM_KINDS:
            return 0.0
        key = (p.executor.id, spec.model or "", spec.adapter or "")
        if key in self._warmed or not p.inputs:
            return 0.0
        self._warmed.add(key)
        t0 = time.time()
        await self._run_watched(p.executor, p.inputs, p.model)
        return time.time() - t0

    async def _run_watched(
        self, executor: Executor, inputs: list[OpInput], model: Any
    ) -> list[Outcome]:
        """executor.run in a thread of its own, held to the wall-time limit per operator
        (per batch for executors that run the batch as one). This loop keeps beating
        meanwhile: a tenant's slow operator neither stops the heartbeats nor holds the
        worker past the limit."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Outcome]] = loop.create_future()
        watch = Watch(OP_WALL_S)

        def settle(result: list[Outcome] | None, exc: BaseException | None) -> None:
            if done.done():
                return  # abandoned: nobody waits for it any more
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result or [])

        def body() -> None:
            try:
                result = watched(watch, lambda: executor.run(inputs, model))
            except BaseException as exc:  # OpTimeout included: the loop reports it
                outcome: tuple[list[Outcome] | None, BaseException | None] = (None, exc)
            else:
                outcome = (result, None)
            # an abandoned thread may end after its worker's loop has closed
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, *outcome)

        # the executor's logs keep this batch's bound context (as asyncio.to_thread does)
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(body,), name=f"op-{executor.id}", daemon=True
        )
        thread.start()
        while True:
            finished, _ = await asyncio.wait({done}, timeout=WATCH_POLL_S)
            if finished:
                return done.result()
            late = watch.overdue()
            if late <= 0:
                continue
            if late > ABANDON_AFTER_S:
                # blocked in C code that never returns to Python: stop waiting for it
                log.error(
                    "operator thread abandoned past its wall-time limit",
                    worker=self.id,
                    executor=executor.id,
                    limit_s=OP_WALL_S,
                    key=watch.key[:12],
                )
                self.abandoned += 1
                metrics.op_abandoned(executor.kind)
                self._abandoned = [t for t in self._abandoned if t.is_alive()] + [thread]
                if model is not None:
                    self.restart_reason = "an abandoned operator thread may still use its model"
                elif len(self._abandoned) > MAX_ABANDONED:
                    self.restart_reason = f"{len(self._abandoned)} operator threads abandoned"
                done.cancel()
                return [wall_limit_error(OP_WALL_S, executor.id) for _ in inputs]
            if watch.interrupt():
                log.warning(
                    "operator past its wall-time limit; interrupting",
                    worker=self.id,
                    executor=executor.id,
                    limit_s=OP_WALL_S,
                    key=watch.key[:12],
                )

    def _retry(self, t: Todo, error: OpError) -> tuple[ReadyOp, str]:
        """A failure with attempts left is not committed: the operator goes back to the
        ready queue (the scheduler may give it to another worker). Only the last
        failure commits, so `failed` is still one compare-and-set."""
        op = msgspec.structs.replace(t.op, attempt=t.op.attempt + 1, failures=t.op.failures + 1)
        log.warning(
            "operator failed; retrying",
            worker=self.id,
            key=op.key[:12],
            failures=op.failures,
            max_attempts=op.max_attempts,
            error=str(error)[:300],
        )
        return op, f"retry-{op.key}-{t.revision}-{op.failures}"

    async def _inputs(self, op: ReadyOp) -> OpInput:
        try:
            if op.table is not None:
                slots = [[await self._source_row(op.table, op.row, op.spec.inputs[0])]]
            elif op.spec.fanout == "record":
                slots = [[await self.cas.get_record(d)] for d in op.spec.inputs]
            else:
                slots = [
                    await self.cas.get_records(await self.cas.get_manifest(m))
                    for m in op.spec.inputs
                ]
        except CASError as exc:
            raise RuntimeError(f"inputs of {op.key[:12]} unreadable: {exc}") from exc
        return OpInput(key=op.key, params=op.spec.params, inputs=slots)

    async def _source_row(self, table: str, row: int, digest: str) -> dict[str, Any]:
        """Row `row` of a source table, checked against the record digest its operator
        key covers (a table is read once and kept for the operators after it)."""
        records = self._tables.get(table)
        if records is None:
            records = await self.cas.get_table(table)
            self._tables[table] = records
            while len(self._tables) > TABLES_KEPT:
                self._tables.pop(next(iter(self._tables)))
        if not 0 <= row < len(records):
            raise CASError(f"table {table[:12]} has no row {row}")
        record = records[row]
        if codec.digest_of(record) != digest:
            raise CASError(f"row {row} of table {table[:12]} is not record {digest[:12]}")
        return record

    async def _state(self, key: str) -> tuple[OpState | None, int]:
        try:
            entry = await self.kv_ops.get(key)
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, entry.revision or 0
        return codec.decode(entry.value, OpState), entry.revision or 0

    async def _commit_all(
        self, commits: list[tuple[Todo, Outcome, float, float, float, int, float]]
    ) -> list[OpDone]:
        """Commit each operator once: its result in the CAS, then a compare-and-set of
        its KV entry from `pending`. The writes go out pipelined (each its own check on
        its own key, so order does not matter): a batch of 256 waits one round trip,
        not 256. A refused write means someone else wrote the entry: read, and either
        theirs stands (final) or the entry was claimed again (commit on that)."""
        if not commits:
            return []
        # every result record of the batch stored in one go (hashing, compression and
        # file writes off the event loop), not one blob write per operator
        results: list[list[dict[str, Any]]] = [
            [await store_artifacts(self.cas, r) for r in c[1]]
            if not isinstance(c[1], OpError)
            else []
            for c in commits
        ]
        flat = await self.cas.put_records([r for rs in results for r in rs])
        digests: list[list[str]] = []
        at = 0
        for rs in results:
            digests.append(flat[at : at + len(rs)])
            at += len(rs)
        sizes = [sum(len(codec.encode(r)) for r in rs) for rs in results]
        # a manifest only when the digests are too many to travel inline
        big = [
            i
            for i, (c, d) in enumerate(zip(commits, digests, strict=True))
            if not isinstance(c[1], OpError) and len(d) > INLINE_OUTPUTS
        ]
        stored = await asyncio.gather(*(self.cas.put_manifest(digests[i]) for i in big))
        manifests = dict(zip(big, stored, strict=True))
        states = [
            self._final_state(*c, d, manifests.get(i), n)
            for i, (c, d, n) in enumerate(zip(commits, digests, sizes, strict=True))
        ]
        written = await self.bus.kv_write_many(
            streams.KV_OPS,
            [
                (c[0].op.key, codec.encode(st), c[0].revision)
                for c, st in zip(commits, states, strict=True)
            ],
        )
        out: list[OpDone] = []
        won: list[OpState] = []
        for st, rev in zip(states, written, strict=True):
            if rev is None:
                out.append(await self.bus.retrying("commit", functools.partial(self._settle, st)))
            else:
                won.append(st)
                out.append(st.to_done())
        metrics.ops_committed(won)  # only a commit that won is counted (and charged)
        return out

    async def _settle(self, state: OpState) -> OpDone:
        """A commit whose compare-and-set was refused: what the entry says now decides."""
        for _ in range(8):
            current, revision = await self._state(state.key)
            if current is not None and current.state != "pending":
                # someone committed first (a replay raced us): theirs stands
                if current.worker != self.id or current.ended_at != state.ended_at:
                    log.info("commit lost to an earlier one", worker=self.id, key=state.key[:12])
                return current.to_done()
            try:
                if current is not None:
                    # claimed again since (an invalidation): same key, same work
                    await self.kv_ops.update(state.key, codec.encode(state), last=revision)
                else:
                    await self.kv_ops.create(state.key, codec.encode(state))
            except KeyWrongLastSequenceError:
                continue
            metrics.ops_committed([state])
            return state.to_done()
        raise RuntimeError(f"operator {state.key[:12]}: its KV entry keeps changing")

    def _final_state(
        self,
        t: Todo,
        outcome: Outcome,
        started: float,
        ended: float,
        share: float,
        size: int,
        overhead: float,
        digests: list[str],
        manifest: str | None,
        output_bytes: int = 0,
    ) -> OpState:
        """The entry that commits `t`: `digests` are its result records, stored
        (`output_bytes` of them, as JSON), and `manifest` lists them when they are too
        many to travel inline."""
        op = t.op
        tb = ""
        if isinstance(outcome, OpError):
            status, error, digests = "failed", str(outcome), []
            tb = _traceback_of(outcome)
        else:
            status, error = "done", None
        inline = manifest is None
        created = t.pending.created_at if t.pending else (op.created_at or started)
        return OpState(
            key=op.key,
            state=status,  # type: ignore[arg-type]
            spec=op.spec,
            workflow_id=op.workflow_id,
            tenant=op.tenant,
            created_at=created,
            output=manifest,
            outputs=digests if inline else None,
            n_outputs=len(digests),
            output_bytes=output_bytes if status == "done" else 0,
            error=error,
            worker=self.id,
            device_class=self.config.device_class,
            started_at=started,
            ended_at=ended,
            attempts=op.attempt + 1,
            batch_size=size,
            device_seconds=share,
            price_per_hour=self.config.price_per_hour,
            watts=self.config.watts,
            cost_usd=share * self.config.price_per_hour / 3600.0,
            energy_j=share * self.config.watts,
            overhead_seconds=overhead,
            traceback=tb,
        )


def done_messages(batch_id: str, done: list[OpDone]) -> list[tuple[str, Any, str | None]]:
    """A batch's completions as few fm.op.done messages as fit DONE_MESSAGE_BYTES each.
    The message id covers the commits it announces (their keys and end times): a
    replay of the same announcement is a duplicate, a later commit of a key is not."""
    out: list[tuple[str, Any, str | None]] = []
    part: list[OpDone] = []
    size = 0
    for d in done:
        n = len(codec.encode(d))
        if part and size + n > DONE_MESSAGE_BYTES:
            out.append(_done_message(batch_id, part))
            part, size = [], 0
        part.append(d)
        size += n
    if part:
        out.append(_done_message(batch_id, part))
    return out


def _done_message(batch_id: str, part: list[OpDone]) -> tuple[str, DoneBatch, str]:
    ident = codec.digest_of([[d.key, f"{d.ended_at:.6f}"] for d in part])
    return subjects.DONE, DoneBatch(batch_id, part), f"done-{ident}"


def ready_messages(ops: list[tuple[ReadyOp, str]]) -> list[tuple[str, Any, str | None]]:
    """Operators back to the ready pool: one chunk per batch key (an isolated one has
    a key of its own), with an id made of theirs so a replay is a duplicate."""
    ids = dict((op.key, msg_id) for op, msg_id in ops)
    out: list[tuple[str, Any, str | None]] = []
    for chunk in chunks_of([op for op, _ in ops], 256):
        ident = codec.digest_of([ids[it.key] for it in chunk.items])
        out.append((subjects.ready(pool_of(chunk.spec.kind)), chunk, f"ready-{ident}"))
    return out


def _bounded(key: str, outcome: Outcome) -> Outcome:
    if isinstance(outcome, OpError):
        return outcome
    try:
        return check_output(key[:12], outcome)
    except OpError as exc:
        return exc


def _batch_error(exc: Exception) -> OpError:
    err = OpError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc  # its traceback is reported with the failure
    return err


TRACEBACK_CHARS = 4000


def _traceback_of(err: OpError) -> str:
    """Where the executor (or the user's transform) raised: the cause's traceback, the
    innermost frames kept when it is long (the message must stay small)."""
    cause = err.__cause__ if isinstance(err.__cause__, BaseException) else err
    if cause.__traceback__ is None:
        return ""
    return "".join(traceback.format_exception(cause))[-TRACEBACK_CHARS:]


def default_model_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "models"
