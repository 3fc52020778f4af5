"""Per-tenant quotas of the gateway, held across every gateway process.

Two kinds of quota, kept two ways:

* **State** (running workflows, operators in flight, bytes stored) lives in one KV entry
  per tenant (bucket fm_tenant_use), changed only by compare-and-set: a submission
  reads it, checks it, and writes itself in on the revision it read, or reads again.
  Two gateways cannot both admit the last slot, and N gateways do not give a tenant N
  times its quota. The entry stays small: it lists only the tenant's running workflows
  (at most `workflows_running`), and a sum for the finished ones.
* **Rates** (requests per second, burst, requests in progress) are split: each of the
  N live gateways (fm_gateways, a heartbeat entry each) allows 1/N of them. NATS hands
  each request of the queue group to one member at random, so a tenant's requests
  spread evenly and the N shares add up to its quota, without a shared write on every
  request (a flood of them would turn a shared counter into a contention storm).

Bytes stored are a tenant's datasets (its records as JSON, counted at submission) plus
the outputs its workflows created (each operator's records as JSON, written on its
entry by the worker, summed once the workflow has finished). A submission that finds a
workflow finished counts its datasets at once and leaves its outputs to a task of the
gateway that reads them and adds them to the entry, so no request waits for that read.
Outputs of a workflow still running count once it ends; the operators in flight bound
what one can add meanwhile. Results are kept until the operator removes
them, so the figure only grows: the operator raises FLOWMESH_TENANT_STORED_BYTES, or
deletes the tenant's fm_tenant_use entry to start it from zero.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.messages import WorkflowStatus

log = structlog.get_logger("flowmesh.quota")

CAS_ATTEMPTS = 12  # reads and compare-and-sets of one submission before it gives up
# a workflow in the entry that never got a status (its submission lost, or refused)
# stops counting after this long
UNSEEN_FORGET_S = 600.0
OUTPUT_READS_AT_ONCE = 64
OUTPUT_SIZES_KEPT = 10_000  # finished workflows' output bytes a gateway remembers
UNSIZED_KEPT = 1_000  # finished workflows of one tenant whose outputs are not yet added


@dataclass(frozen=True)
class Quotas:
    """Per tenant, across all gateways. Defaults from FLOWMESH_TENANT_* variables."""

    rps: float = 50.0  # sustained requests per second
    burst: int = 100  # requests at once above the rate
    concurrent: int = 8  # requests in progress at once
    ops_in_flight: int = 200_000  # operators of its running workflows (planned, not done)
    workflows_running: int = 100
    stored_bytes: int = 10 * 1024**3  # datasets and outputs of its workflows

    @classmethod
    def from_env(cls) -> Quotas:
        env = os.environ.get
        return cls(
            rps=float(env("FLOWMESH_TENANT_RPS", cls.rps)),
            burst=int(env("FLOWMESH_TENANT_BURST", cls.burst)),
            concurrent=int(env("FLOWMESH_TENANT_CONCURRENT", cls.concurrent)),
            ops_in_flight=int(env("FLOWMESH_TENANT_OPS_IN_FLIGHT", cls.ops_in_flight)),
            workflows_running=int(env("FLOWMESH_TENANT_WORKFLOWS", cls.workflows_running)),
            stored_bytes=int(env("FLOWMESH_TENANT_STORED_BYTES", cls.stored_bytes)),
        )

    def share(self, gateways: int) -> Quotas:
        """This process's part of the rate quotas when `gateways` serve the API."""
        n = max(1, gateways)
        if n == 1:
            return self
        return Quotas(
            rps=self.rps / n,
            burst=max(1, math.ceil(self.burst / n)),
            concurrent=max(1, math.ceil(self.concurrent / n)),
            ops_in_flight=self.ops_in_flight,
            workflows_running=self.workflows_running,
            stored_bytes=self.stored_bytes,
        )


class RunningUse(msgspec.Struct):
    ops: int  # operators it may start
    dataset_bytes: int
    since: float  # when it was admitted


class TenantUse(msgspec.Struct):
    """fm_tenant_use/<tenant>."""

    running: dict[str, RunningUse] = {}
    stored_bytes: int = 0  # datasets and outputs of its finished workflows
    unsized: list[str] = []  # finished workflows whose outputs are still to be added

    def in_flight(self) -> int:
        return sum(r.ops for r in self.running.values())

    def stored(self) -> int:
        """Bytes stored, the running workflows' datasets included."""
        return self.stored_bytes + sum(r.dataset_bytes for r in self.running.values())


class QuotaExceeded(Exception):
    """The submission would take the tenant past a quota (the message says which)."""


class QuotaBusy(Exception):
    """The tenant's entry kept changing under this submission (many at once)."""


class Ledger:
    """The shared per-tenant quota state (see the module's docstring)."""

    def __init__(self, bus: Bus, quotas: Quotas) -> None:
        self.bus = bus
        self.quotas = quotas
        # finished workflows' output bytes: they do not change, and a retried
        # compare-and-set should not read their operators again
        self._outputs: OrderedDict[str, int] = OrderedDict()
        self._sizing: dict[str, asyncio.Task[None]] = {}  # tenant -> its sizing task

    async def read(self, tenant: str) -> tuple[TenantUse, int]:
        """The tenant's entry and its revision (0: none yet)."""
        kv = await self.bus.kv(streams.KV_TENANT_USE)
        try:
            entry = await kv.get(tenant)
        except KeyNotFoundError:
            return TenantUse(), 0
        if not entry.value:
            return TenantUse(), entry.revision or 0
        try:
            return codec.decode(entry.value, TenantUse), entry.revision or 0
        except codec.DecodeError:
            log.error("tenant usage entry unreadable; starting it again", tenant=tenant)
            return TenantUse(), entry.revision or 0

    async def _write(self, tenant: str, use: TenantUse, revision: int) -> bool:
        """Compare-and-set; False when someone wrote the entry since `revision`."""
        kv = await self.bus.kv(streams.KV_TENANT_USE)
        try:
            if revision:
                await kv.update(tenant, codec.encode(use), last=revision)
            else:
                await kv.create(tenant, codec.encode(use))
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:
            # a replicated stream words the refusal differently (10164): a conflict too
            if "wrong last sequence" in str(exc) or "key exists" in str(exc):
                return False
            raise
        return True

    async def admit(self, tenant: str, workflow_id: str, ops: int, dataset_bytes: int) -> TenantUse:
        """Take `ops` operators in flight and `dataset_bytes` stored for `workflow_id`,
        or QuotaExceeded saying which quota it would pass. A resubmission of an id the
        entry holds counts once."""
        for attempt in range(CAS_ATTEMPTS):
            use, revision = await self.read(tenant)
            await self._settle(use)
            use.running.pop(workflow_id, None)
            self._check(tenant, use, ops, dataset_bytes)
            use.running[workflow_id] = RunningUse(ops, dataset_bytes, time.time())
            if await self._write(tenant, use, revision):
                if use.unsized:
                    self._size_later(tenant)
                return use
            await asyncio.sleep(random.uniform(0.005, 0.02) * 2 ** min(attempt, 5))
        raise QuotaBusy(f"tenant {tenant!r}: too many submissions at once; retry")

    async def release(self, tenant: str, workflow_id: str) -> None:
        """Forget a submission that did not go through (nothing of it was stored)."""
        for attempt in range(CAS_ATTEMPTS):
            use, revision = await self.read(tenant)
            if workflow_id not in use.running:
                return
            del use.running[workflow_id]
            if await self._write(tenant, use, revision):
                return
            await asyncio.sleep(random.uniform(0.005, 0.02) * 2 ** min(attempt, 5))
        log.warning("could not release a refused submission", tenant=tenant, wf=workflow_id)

    def _check(self, tenant: str, use: TenantUse, ops: int, dataset_bytes: int) -> None:
        q = self.quotas
        if len(use.running) >= q.workflows_running:
            raise QuotaExceeded(
                f"{len(use.running)} workflows running; the quota is {q.workflows_running}"
            )
        if use.in_flight() + ops > q.ops_in_flight:
            raise QuotaExceeded(
                f"{use.in_flight()} operators in flight and {ops} more asked for; "
                f"the quota is {q.ops_in_flight} (wait for some to finish, or cancel)"
            )
        if use.stored() + dataset_bytes > q.stored_bytes:
            raise QuotaExceeded(
                f"tenant {tenant!r} stores {use.stored()} bytes (datasets and outputs) "
                f"and this submission's datasets add {dataset_bytes}; the quota is "
                f"{q.stored_bytes} bytes stored"
            )

    async def _settle(self, use: TenantUse) -> None:
        """Move the entry's finished workflows into its stored bytes (their datasets and
        the outputs they created); forget ones that never got a status."""
        ids = list(use.running)
        statuses = await asyncio.gather(*(self._status(wf) for wf in ids))
        now = time.time()
        for wf, status in zip(ids, statuses, strict=True):
            if status is None:
                if now - use.running[wf].since > UNSEEN_FORGET_S:
                    del use.running[wf]
                continue
            if status.state == "running":
                continue
            done = use.running.pop(wf)
            use.stored_bytes += done.dataset_bytes
            use.unsized.append(wf)
        if len(use.unsized) > UNSIZED_KEPT:
            # sizing has not kept up (it failed for a long while): count what it can
            log.warning("tenant outputs left uncounted", workflows=len(use.unsized) - UNSIZED_KEPT)
            del use.unsized[:-UNSIZED_KEPT]

    def _size_later(self, tenant: str) -> None:
        """Add the outputs of the tenant's finished workflows to its entry, in a task of
        its own (one per tenant at a time)."""
        task = self._sizing.get(tenant)
        if task is not None and not task.done():
            return
        task = asyncio.create_task(self._size(tenant))
        self._sizing[tenant] = task

    async def _size(self, tenant: str) -> None:
        try:
            use, _ = await self.read(tenant)
            sizes = {wf: await self.output_bytes(wf) for wf in use.unsized}
            for attempt in range(CAS_ATTEMPTS):
                use, revision = await self.read(tenant)
                # only those still unsized: another gateway may have added some already
                mine = [wf for wf in use.unsized if wf in sizes]
                if not mine:
                    return
                use.stored_bytes += sum(sizes[wf] for wf in mine)
                use.unsized = [wf for wf in use.unsized if wf not in sizes]
                if await self._write(tenant, use, revision):
                    return
                await asyncio.sleep(random.uniform(0.005, 0.02) * 2 ** min(attempt, 5))
        except Exception as exc:  # the next submission tries again
            log.warning("sizing a tenant's outputs failed", tenant=tenant, error=repr(exc))

    async def stop(self) -> None:
        for task in self._sizing.values():
            task.cancel()
        await asyncio.gather(*self._sizing.values(), return_exceptions=True)
        self._sizing.clear()

    async def _status(self, workflow_id: str) -> WorkflowStatus | None:
        kv = await self.bus.kv(streams.KV_WF)
        try:
            entry = await kv.get(workflow_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return codec.decode(entry.value, WorkflowStatus)
        except codec.DecodeError:
            return None

    async def output_bytes(self, workflow_id: str) -> int:
        """Bytes of the output records the workflow's operators wrote, counting only the
        operators it created (one reused from another workflow is that one's), read from
        its own operator entries once."""
        known = self._outputs.get(workflow_id)
        if known is not None:
            return known
        from flowmesh.engine.lineage.reads import op_state, requests_of_workflow

        keys = sorted(
            {r.key for reqs in (await requests_of_workflow(self.bus, workflow_id)).values()
             for r in reqs}
        )  # fmt: skip
        sem = asyncio.Semaphore(OUTPUT_READS_AT_ONCE)

        async def size(key: str) -> int:
            async with sem:
                state = await op_state(self.bus, key)
            if state is None or state.workflow_id != workflow_id or state.state != "done":
                return 0
            return state.output_bytes

        total = sum(await asyncio.gather(*(size(k) for k in keys)))
        self._outputs[workflow_id] = total
        while len(self._outputs) > OUTPUT_SIZES_KEPT:
            self._outputs.popitem(last=False)
        return total


class GatewayPeers:
    """How many gateways serve the API now: each puts its id in fm_gateways every
    GATEWAY_TTL_S / 3 and counts the ids there (an entry not renewed expires)."""

    def __init__(self, bus: Bus, gateway_id: str) -> None:
        self.bus = bus
        self.id = gateway_id
        self.count = 1

    async def beat(self) -> int:
        kv = await self.bus.kv(streams.KV_GATEWAYS)
        await kv.put(self.id, b"")
        self.count = max(1, len(await self.bus.kv_keys(streams.KV_GATEWAYS)))
        return self.count

    async def leave(self) -> None:
        kv = await self.bus.kv(streams.KV_GATEWAYS)
        await kv.delete(self.id)
