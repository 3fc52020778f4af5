"""The state every part of the planner shares, and the calls between the parts.

The planner is one object composed from the parts named for their jobs: intake
(submissions in, replay, cancel), expansion (nodes into operators: claims, request
records, ready chunks), completion (done operators advance their workflows) and status
(written to KV fm_wf). Each part is a mixin over `PlannerBase`; a call from one part into
another goes through the abstract methods declared here."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

import structlog

from flowmesh.engine import metrics
from flowmesh.engine.planner.state import Parked, Pos, Retry, Waiter, WorkflowRun
from flowmesh.engine.shards import check_shard
from flowmesh.topics import Bus
from flowmesh.topics.bus.kv import KV
from flowmesh.topics.bus.transport import Stop
from flowmesh.topics.config.settings import env_int
from flowmesh.topics.messages import OpDone
from flowmesh.topics.store.cas import CAS

log = structlog.get_logger("flowmesh.planner")

FANOUT_WINDOW = 2048  # operators a fan-out starts as one wave
READY_CHUNK = 256  # operators per ready message at most
# Submissions accepted at once: one tenant's huge fan-out (or a 60 s wait for an
# executor to appear) never delays another's acceptance; bounded, so a flood of
# submissions does not expand without limit.
ACCEPT_CONCURRENCY = 16


DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_RECLAIMS = 6
# a batch that lost its worker twice is split into batches of one (workers/runtime.py
# ISOLATE_AFTER): an operator needs one more delivery than that before the limit
MIN_RECLAIMS = 3


def max_attempts_from_env() -> int:
    """Executions an operator may fail before it is committed `failed`
    ($FLOWMESH_MAX_ATTEMPTS, default 3; 1 turns retries off)."""
    return env_int("FLOWMESH_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, 1)


def max_reclaims_from_env() -> int:
    """Times an operator's worker may be lost under it before it is committed `failed`
    ($FLOWMESH_MAX_RECLAIMS, default 6, at least 3); it travels with the operator."""
    return env_int("FLOWMESH_MAX_RECLAIMS", DEFAULT_MAX_RECLAIMS, MIN_RECLAIMS)


class PlannerBase(ABC):
    def __init__(
        self,
        bus: Bus,
        cas: CAS,
        *,
        resolve_wait_s: float = 60.0,
        status_interval_s: float = 0.25,
        max_attempts: int | None = None,
        max_reclaims: int | None = None,
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
        self.max_reclaims = max(MIN_RECLAIMS, max_reclaims or max_reclaims_from_env())
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
        self.retries: list[Retry] = []  # done again by the parked loop
        self._dirty: set[str] = set()
        self._resolved: dict[tuple[str, str], tuple[str | None, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stop_cancels: Stop | None = None  # listening to fm.wf.cancel

    def _retry_later(self, retry: Retry, error: BaseException) -> None:
        """Queue a refused step for the retry loop; said at most every 5 s (a bus down
        for minutes would say it once per step per half second)."""
        self.retries.append(retry)
        metrics.planner_retry(retry.what)
        if metrics.due("planner-retry", 5.0):
            log.warning(
                "planner step refused; retrying",
                what=retry.what,
                workflow=retry.run.wf_id,
                waiting=len(self.retries),
                error=repr(error),
            )

    kv_ops: KV
    kv_wf: KV
    kv_exec: KV
    kv_models: KV
    kv_requests: KV

    # --- the calls between the parts (each defined by the part named) ---------------

    @abstractmethod
    async def _fan_out(
        self, run: WorkflowRun, name: str, slots: list[tuple[Pos, list[str]]]
    ) -> None:
        """expansion"""

    @staticmethod
    @abstractmethod
    def _count_children(
        run: WorkflowRun, name: str, slots: list[tuple[Pos, list[str]]]
    ) -> dict[str, list[tuple[Pos, list[str]]]]:
        """expansion"""

    @abstractmethod
    async def _start_children(
        self, run: WorkflowRun, children: dict[str, list[tuple[Pos, list[str]]]]
    ) -> None:
        """expansion"""

    @abstractmethod
    async def _start_op(self, run: WorkflowRun, name: str, pos: Pos, inputs: list[str]) -> None:
        """expansion"""

    @abstractmethod
    async def _start_ops(
        self, run: WorkflowRun, name: str, starts: list[tuple[Pos, list[str]]]
    ) -> None:
        """expansion"""

    @abstractmethod
    async def complete_keys(self, dones: list[OpDone]) -> None:
        """completion"""

    @abstractmethod
    async def _maybe_complete(self, run: WorkflowRun, name: str) -> None:
        """completion"""

    @abstractmethod
    async def _fail(self, run: WorkflowRun, error: str) -> None:
        """completion"""

    @abstractmethod
    async def _write_status(self, run: WorkflowRun) -> None:
        """status"""
