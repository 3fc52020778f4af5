"""The tenant-facing gateway: request/reply on `fm.api.<tenant>.<verb>`.

Tenants never touch JetStream: KV and object-store permissions cannot be cut per key, so
a tenant's NATS user may only publish under its own `fm.api.<tenant>.>` and read its own
inbox (engine/auth.py). The subject's tenant token is therefore the caller's identity,
vouched for by the server, and every verb here answers only for that tenant's workflows.
Another tenant's workflow is answered exactly like a missing one ("not found"), so a
tenant cannot even learn that it exists.

Engines serve the API in one queue group, so any number of them share the load.

The verbs, their request and reply bodies (submit, status, list, result, lineage, cost,
cancel) and the error codes are the contract's: topics/api.py.

One tenant cannot take the service from the others (issue 17): each has a request rate,
a number of requests in progress at once, running workflows, operators in flight and
bytes stored (engine/quota.py: the rates split among the live gateways, the rest in one
shared entry per tenant); past one, it is answered `too_many_requests` at once, without
queueing. Gateway tenants get `dedup_scope: tenant` whatever their spec asks, unless the
operator lets them share (FLOWMESH_SHARE_TENANTS): shared results tell a tenant whether
and when another ran the same record (see the README, "Tenancy").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.cost import workflows_cost
from flowmesh.engine.lineage import LineageError
from flowmesh.engine.lineage.pages import build_lineage_page
from flowmesh.engine.quota import GatewayPeers, Ledger, QuotaBusy, QuotaExceeded, Quotas
from flowmesh.engine.spec import SpecError, planned_operators
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.api import (
    LIST_MAX,
    LIST_PAGE,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    RESULT_PAGE_ROWS,
    ApiReply,
    Bill,
    CostSummary,
    ErrorCode,
    LineageRequest,
    PageRequest,
    ResultPage,
    ResultRequest,
    SubmitReply,
    SubmitRequest,
    WorkflowRequest,
    WorkflowSummary,
)
from flowmesh.topics.messages import CancelWorkflow, WorkflowStatus
from flowmesh.topics.store.cas import CAS, CASError

log = structlog.get_logger("flowmesh.gateway")

QUEUE = "fm-gateway"
CONCURRENCY = 32  # requests handled at once per engine
HEAVY_AT_ONCE = 2  # per tenant: cost, lineage and result requests in progress at once
# How long submit waits for the planner to accept the workflow, so that a status right
# after it finds it; past that the submission (stored in its stream) is still run.
ACCEPT_WAIT_S = 10.0

CANCEL_WAIT_S = 5.0  # how long cancel waits to see the planner mark it cancelled


def share_tenants_from_env() -> frozenset[str]:
    """Tenants the operator lets dedup globally (FLOWMESH_SHARE_TENANTS=a,b)."""
    raw = os.environ.get("FLOWMESH_SHARE_TENANTS", "")
    return frozenset(t.strip() for t in raw.split(",") if t.strip())


@dataclass
class _TenantUse:
    """A tenant's request rate and requests in progress at this gateway."""

    tokens: float
    stamp: float
    active: int = 0


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        super().__init__(message)


def gateway_workflow_id(tenant: str, given: str | None) -> str:
    """A tenant's workflow ids live in its own namespace ("<tenant>_<id>"), so one tenant
    can neither collide with nor probe for another's ids by submitting them."""
    prefix = f"{tenant}_"
    own = given if given and given.startswith(prefix) else prefix + (given or _new_id())
    if not subjects.is_token(own):
        raise ApiError("bad_request", f"workflow id {own!r} must match [A-Za-z0-9_-]{{1,64}}")
    return own


def _new_id() -> str:
    return f"wf-{uuid.uuid4().hex[:16]}"


def _decode(data: bytes, typ: type[Any]) -> Any:
    try:
        return codec.decode(data or b"{}", typ)
    except codec.DecodeError as exc:
        raise ApiError("bad_request", str(exc)) from exc


# --- the server -------------------------------------------------------------------------


class Gateway:
    def __init__(
        self,
        bus: Bus,
        cas: CAS,
        concurrency: int = CONCURRENCY,
        quotas: Quotas | None = None,
        share_tenants: frozenset[str] | None = None,
    ) -> None:
        self.bus = bus
        self.cas = cas
        self.quotas = quotas or Quotas.from_env()
        self.share_tenants = share_tenants_from_env() if share_tenants is None else share_tenants
        self._use: dict[str, _TenantUse] = {}
        self.ledger = Ledger(bus, self.quotas)  # the quotas shared by every gateway
        self.peers = GatewayPeers(bus, f"gw-{uuid.uuid4().hex[:12]}")
        # reads that scan records (cost, lineage, result): at most HEAVY_AT_ONCE of one
        # tenant's at a time; the rest of its requests wait their turn, others' do not
        self._heavy: dict[str, asyncio.Semaphore] = {}
        self.fm = FlowMesh(bus, cas)  # submit/validation/upload as the SDK does them
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.peers.beat()
        self._beat = asyncio.create_task(self._beat_loop())
        self._sub = await self.bus.nc.subscribe(subjects.API_ALL, queue=QUEUE, cb=self._on_msg)
        log.info("gateway serving", subject=subjects.API_ALL, queue=QUEUE, peers=self.peers.count)

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(streams.GATEWAY_TTL_S / 3)
            try:
                await self.peers.beat()
            except Exception as exc:  # a nats restart: beat again once it is back
                log.warning("gateway heartbeat failed", error=str(exc))

    async def stop(self) -> None:
        await self.ledger.stop()
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(BaseException):
                await self._beat
            self._beat = None
            with contextlib.suppress(Exception):  # the others' shares grow at once
                await self.peers.leave()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection may already be gone
                log.debug("gateway unsubscribe failed", error=str(exc))
            self._sub = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_msg(self, msg: Msg) -> None:
        # one task per request: a slow result read must not hold up everyone's status
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        parsed = subjects.parse_api(msg.subject)
        if parsed is None or not msg.reply:
            log.warning("gateway request without reply or verb", subject=msg.subject)
            return
        tenant, verb = parsed
        # Answers go only to the asking tenant's own inbox: a tenant cannot direct the
        # gateway to publish into someone else's.
        try:
            inbox = subjects.tenant_inbox_prefix(tenant) + "."
        except ValueError:
            inbox = None
        if inbox is None or not msg.reply.startswith(inbox):
            log.warning("gateway reply subject outside the tenant's inbox", subject=msg.subject)
            return
        started = time.monotonic()
        use = self._admit(tenant)
        if use is None:
            # refused before it takes one of the engine's slots: a flood over quota never
            # queues ahead of another tenant's requests
            await self._reply(
                msg.reply,
                ApiReply(
                    ok=False,
                    code="too_many_requests",
                    error=f"tenant {tenant!r} is over its request quota ({self.quotas.rps:g}/s, "
                    f"{self.quotas.concurrent} at once, across {self.peers.count} "
                    "gateways); retry later",
                ),
                verb,
                tenant,
            )
            return
        async with self._sem:
            try:
                if len(msg.data) > MAX_REQUEST_BYTES:
                    raise ApiError(
                        "too_large",
                        f"request of {len(msg.data)} bytes exceeds the gateway's "
                        f"{MAX_REQUEST_BYTES}-byte limit",
                    )
                reply = ApiReply(ok=True, data=await self.dispatch(tenant, verb, msg.data))
            except ApiError as exc:
                reply = ApiReply(ok=False, code=exc.code, error=str(exc))
            except Exception:
                # never a crash of the shared engine, and no internals in the answer
                ref = uuid.uuid4().hex[:8]
                log.exception("gateway request failed", ref=ref, verb=verb, tenant=tenant)
                reply = ApiReply(ok=False, code="internal", error=f"internal error (ref {ref})")
            finally:
                use.active -= 1
        await self._reply(msg.reply, reply, verb, tenant)
        log.debug(
            "gateway request",
            tenant=tenant,
            verb=verb,
            ok=reply.ok,
            code=reply.code,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _reply(self, subject: str, reply: ApiReply, verb: str, tenant: str) -> None:
        body = codec.encode(reply)
        if len(body) > MAX_REPLY_BYTES:
            body = codec.encode(
                ApiReply(
                    ok=False,
                    code="too_large",
                    error=f"the answer ({len(body)} bytes) is too large for one reply; "
                    "ask for less (one node, or a smaller result page)",
                )
            )
        try:
            await self.bus.nc.publish(subject, body)
        except Exception as exc:
            log.warning("gateway reply failed", error=str(exc), verb=verb, tenant=tenant)

    async def dispatch(self, tenant: str, verb: str, data: bytes) -> Any:
        """Answer one request of `tenant` (the identity the subject carries)."""
        try:
            subjects.check_tenant(tenant)
        except ValueError as exc:
            raise ApiError("bad_request", str(exc)) from exc
        if verb == "submit":
            return await self.submit(tenant, _decode(data, SubmitRequest))
        if verb == "status":
            return await self._owned(tenant, _decode(data, WorkflowRequest).workflow_id)
        if verb == "list":
            page = _decode(data, PageRequest)
            return await self.list(tenant, page.offset, page.limit)
        heavy = self._heavy.setdefault(tenant, asyncio.Semaphore(HEAVY_AT_ONCE))
        if verb == "result":
            async with heavy:
                return await self.result(tenant, _decode(data, ResultRequest))
        if verb == "lineage":
            async with heavy:
                return await self.lineage(tenant, _decode(data, LineageRequest))
        if verb == "cost":
            page = _decode(data, PageRequest)
            async with heavy:
                return await self.cost(tenant, page.offset, page.limit)
        if verb == "cancel":
            return await self.cancel(tenant, _decode(data, WorkflowRequest).workflow_id)
        verbs = ", ".join(subjects.API_VERBS)
        raise ApiError("bad_request", f"unknown verb {verb!r} (one of {verbs})")

    def _admit(self, tenant: str) -> _TenantUse | None:
        """Take one request of `tenant` from its token bucket and its in-progress slots,
        this gateway's share of them; None when it is over either (answered at once:
        nothing queues for it)."""
        now = time.monotonic()
        quotas = self.quotas.share(self.peers.count)
        use = self._use.get(tenant)
        if use is None:
            use = self._use[tenant] = _TenantUse(float(quotas.burst), now)
        use.tokens = min(float(quotas.burst), use.tokens + (now - use.stamp) * quotas.rps)
        use.stamp = now
        if use.tokens < 1.0 or use.active >= quotas.concurrent:
            return None
        use.tokens -= 1.0
        use.active += 1
        return use

    # --- verbs ------------------------------------------------------------------------

    async def _owned(self, tenant: str, workflow_id: str) -> WorkflowStatus:
        """The workflow's status if it is this tenant's; "not found" in every other case,
        worded the same whether it exists or not. An id outside the tenant's namespace is
        never looked up, so the answer's time says nothing about other tenants' ids."""
        mine = subjects.is_token(workflow_id) and workflow_id.startswith(f"{tenant}_")
        status = await self.fm.status(workflow_id) if mine else None
        if status is None or status.tenant != tenant:
            raise ApiError("not_found", f"no workflow {workflow_id!r}")
        return status

    async def submit(self, tenant: str, req: SubmitRequest) -> SubmitReply:
        spec = req.spec
        # "default" is the schema's value when a spec names no tenant
        if spec.tenant not in ("default", tenant):
            raise ApiError(
                "bad_request",
                f"the spec's tenant {spec.tenant!r} is not yours ({tenant!r}); "
                "leave it out or set it to your tenant",
            )
        for name, ds in spec.datasets.items():
            # a path or digest would be resolved on the engine's side: its files, and a
            # probe of what others stored in the CAS
            if ds.records is None or ds.path is not None or ds.digest is not None:
                raise ApiError(
                    "bad_request",
                    f"dataset {name!r}: give its records inline (path and digest datasets "
                    "are not accepted through the gateway)",
                )
        if spec.dedup_scope == "global" and tenant not in self.share_tenants:
            # sharing results across tenants is a side channel (whether and when another
            # tenant ran a record): only tenants the operator opted in share
            spec = msgspec.structs.replace(spec, dedup_scope="tenant")
        workflow_id = gateway_workflow_id(tenant, req.workflow_id)
        # what the submission will store: its records as JSON (the gateway took them in
        # one request, so this is at most the request's size)
        try:
            dataset_bytes = sum(len(codec.encode(ds.records)) for ds in spec.datasets.values())
        except (msgspec.EncodeError, RecursionError, TypeError):
            dataset_bytes = 0  # not encodable: validation refuses it below, with the reason
        try:
            await self.ledger.admit(tenant, workflow_id, planned_operators(spec), dataset_bytes)
        except (QuotaExceeded, QuotaBusy) as exc:
            raise ApiError("too_many_requests", str(exc)) from exc
        try:
            await self.fm.submit(spec, workflow_id, tenant=tenant)
        except (SpecError, CASError) as exc:
            await self.ledger.release(tenant, workflow_id)
            if isinstance(exc, CASError):
                raise ApiError("bad_request", f"cannot store the datasets: {exc}") from exc
            raise ApiError("bad_request", str(exc)) from exc
        except BaseException:
            await asyncio.shield(self.ledger.release(tenant, workflow_id))
            raise
        log.info("gateway submission", tenant=tenant, workflow=workflow_id, name=spec.name)
        deadline = time.monotonic() + ACCEPT_WAIT_S
        while await self.fm.status(workflow_id) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return SubmitReply(workflow_id=workflow_id)

    async def cancel(self, tenant: str, workflow_id: str) -> dict[str, str]:
        """Stop one of the tenant's workflows: its planner starts nothing more for it and
        marks it cancelled. Operators already running finish (each within its limits)."""
        status = await self._owned(tenant, workflow_id)
        if status.state == "running":
            # through the bus the planners listen on (a Kafka topic on --bus kafka)
            await self.bus.transport.broadcast(
                subjects.CANCEL,
                codec.encode(CancelWorkflow(workflow_id, reason=f"cancelled by {tenant}")),
            )
            deadline = time.monotonic() + CANCEL_WAIT_S
            while status.state == "running" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                status = await self._owned(tenant, workflow_id)
        # its operators stop counting as in flight at the tenant's next submission, which
        # finds it no longer running
        return {"workflow_id": workflow_id, "state": status.state}

    async def own_workflows(self, tenant: str) -> list[str]:
        """The tenant's workflow ids: the bucket's key names filtered by the tenant's
        namespace ("<tenant>_"), no other tenant's status read or decoded."""
        names = await self.bus.kv_keys(streams.KV_WF)
        return [n for n in names if n.startswith(f"{tenant}_")]

    async def _page(self, tenant: str, offset: int, limit: int) -> list[WorkflowStatus]:
        if offset < 0 or not 1 <= limit <= LIST_MAX:
            raise ApiError("bad_request", f"offset must be >= 0 and limit 1..{LIST_MAX}")
        ids = await self.own_workflows(tenant)
        statuses = [s for s in await asyncio.gather(*(self.fm.status(w) for w in ids)) if s]
        statuses = [s for s in statuses if s.tenant == tenant]
        statuses.sort(key=lambda s: s.submitted_at, reverse=True)
        return statuses[offset : offset + limit]

    async def list(
        self, tenant: str, offset: int = 0, limit: int = LIST_PAGE
    ) -> list[WorkflowSummary]:
        out = [
            WorkflowSummary(
                workflow_id=st.workflow_id,
                name=st.name,
                state=st.state,
                submitted_at=st.submitted_at,
                ended_at=st.ended_at,
                ops_total=sum(n.total for n in st.nodes.values()),
                ops_done=sum(n.done for n in st.nodes.values()),
                tenant=st.tenant,
            )
            for st in await self._page(tenant, offset, limit)
        ]
        out.sort(key=lambda s: s.submitted_at)
        return out

    async def result(self, tenant: str, req: ResultRequest) -> ResultPage:
        status = await self._owned(tenant, req.workflow_id)
        ns = status.nodes.get(req.node)
        if ns is None:
            raise ApiError(
                "not_found",
                f"workflow {req.workflow_id} has no node {req.node!r} "
                f"(nodes: {', '.join(status.nodes)})",
            )
        if not ns.complete or ns.output is None:
            raise ApiError(
                "not_complete",
                f"node {req.node!r} of {req.workflow_id} is not complete ({ns.done}/{ns.total})",
            )
        if req.offset < 0 or req.limit < 1:
            raise ApiError("bad_request", "offset must be >= 0 and limit >= 1")
        digests = await self.cas.get_manifest(ns.output)
        page = digests[req.offset : req.offset + min(req.limit, RESULT_PAGE_ROWS)]
        records = await self.cas.get_records(page)
        # keep the page under one reply: cut it where the records' size says so
        budget, kept = MAX_REPLY_BYTES - 4096, 0
        for rec in records:
            budget -= len(codec.encode(rec)) + 1
            if budget < 0 and kept:
                break
            kept += 1
        end = req.offset + kept
        return ResultPage(
            records=records[:kept],
            offset=req.offset,
            total=len(digests),
            next_offset=end if end < len(digests) else None,
        )

    async def lineage(self, tenant: str, req: LineageRequest) -> dict[str, Any]:
        """A page of the lineage: what it reads grows with the page, not the workflow."""
        await self._owned(tenant, req.workflow_id)
        try:
            lin = await build_lineage_page(
                self.fm, req.workflow_id, req.node, req.page, req.limit, MAX_REPLY_BYTES - 4096
            )
        except LineageError as exc:
            raise ApiError("not_found", str(exc)) from exc
        return redact_lineage(codec.to_builtins(lin), tenant)

    async def cost(self, tenant: str, offset: int = 0, limit: int = LIST_PAGE) -> CostSummary:
        """The bills of a page of the tenant's workflows (newest first), and their sum;
        read from those workflows' own records (engine/cost.py workflows_cost)."""
        page = [s.workflow_id for s in await self._page(tenant, offset, limit)]
        report = await workflows_cost(self.bus, page)
        own = {wf: b for wf, b in report.workflows.items() if b.tenant == tenant}
        bill = report.tenants.get(tenant)
        return CostSummary(
            tenants={tenant: codec.convert(bill.as_dict(), Bill)} if bill else {},
            workflows={wf: codec.convert(b.as_dict(), Bill) for wf, b in sorted(own.items())},
            offset=offset,
            limit=limit,
        )


def redact_lineage(lin: dict[str, Any], tenant: str) -> dict[str, Any]:
    """A shared (global-scope) operator lists every workflow that asked for it; a tenant
    sees its own requests and only a count of the others, never their ids or tenants."""
    for op in lin.get("ops", {}).values():
        requests = op.get("requests", [])
        own = [r for r in requests if r.get("tenant") == tenant]
        op["requests"] = own
        op["other_requests"] = len(requests) - len(own)
        if op.get("created_by") not in {r.get("workflow_id") for r in own}:
            op["created_by"] = ""
    return lin
