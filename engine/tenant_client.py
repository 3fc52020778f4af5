"""The tenant SDK: everything a tenant does, through the gateway (engine/gateway.py).

    async with await TenantClient.from_creds("creds/acme.json") as fm:
        wf = await fm.submit(load_spec("configs/workflows/demo.yaml"))
        status = await fm.wait(wf)
        rows = await fm.result(wf, "answers")

A tenant's credentials allow nothing but requests on `fm.api.<tenant>.>` and replies in
its own inbox, so this client speaks core NATS request/reply only: no JetStream, no KV,
no CAS. Datasets given by path are read here and sent inline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse, urlunparse

import nats
import structlog
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from flowmesh.engine.client import read_records
from flowmesh.engine.spec import SpecError, validate
from flowmesh.topics import codec, subjects
from flowmesh.topics.api import (
    LINEAGE_PAGE,
    LIST_PAGE,
    MAX_REQUEST_BYTES,
    ApiReply,
    CostSummary,
    Lineage,
    LineageCursor,
    LineageRequest,
    ResultPage,
    SubmitReply,
    SubmitRequest,
    WorkflowRequest,
    WorkflowSummary,
)
from flowmesh.topics.bus.reach import wait_reachable
from flowmesh.topics.config.creds import load_creds
from flowmesh.topics.errors import (
    GatewayError,
    NotComplete,
    NotFound,
    Unavailable,
    WaitTimeout,
    WorkflowFailed,
)
from flowmesh.topics.lineage import collect_pages
from flowmesh.topics.messages import DatasetSpec, WorkflowSpec, WorkflowStatus
from flowmesh.topics.store.cas import Record

# the names tests and older callers import from here
__all__ = ["GatewayError", "NotFound", "TenantClient"]

log = structlog.get_logger("flowmesh.tenant")


class GatewayNotFound(NotFound, GatewayError):
    """The gateway's "not found": a NotFound like the bus client's, and a GatewayError
    like the gateway's other refusals."""

    def __init__(self, message: str) -> None:
        GatewayError.__init__(self, "not_found", message)


class GatewayNotComplete(NotComplete, GatewayError):
    def __init__(self, message: str) -> None:
        GatewayError.__init__(self, "not_complete", message)


DEFAULT_URL = "nats://127.0.0.1:4222"
ACCEPT_GRACE_S = 30.0


class TenantClient:
    def __init__(self, nc: Client, tenant: str, timeout: float = 30.0) -> None:
        self.nc = nc
        self.tenant = subjects.check_tenant(tenant)
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        url: str,
        tenant: str,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        give_up_after: float = 5.0,
    ) -> TenantClient:
        """Unavailable when no server answers at `url` within `give_up_after` seconds."""
        await wait_reachable(url, give_up_after)

        async def on_error(exc: Exception) -> None:
            # a permission violation lands here: the server refused a publish/subscribe
            log.warning("nats error", error=str(exc), tenant=tenant)

        nc = await nats.connect(
            url,
            user=user,
            password=password,
            name=f"flowmesh-tenant-{tenant}",
            # replies come to _INBOX.<tenant>.…: the only subjects it may subscribe to
            inbox_prefix=subjects.tenant_inbox_prefix(tenant),
            connect_timeout=5.0,
            error_cb=on_error,
        )
        return cls(nc, tenant, timeout)

    @classmethod
    async def from_creds(
        cls,
        path: str | Path,
        url: str | None = None,
        timeout: float = 30.0,
        give_up_after: float = 5.0,
    ) -> TenantClient:
        """Connect with a tenant's credentials file (from `flowmesh auth init`)."""
        creds = load_creds(path)
        if creds.tenant is None:
            raise SpecError([f"{path} holds no tenant's credentials (no 'tenant' in it)"])
        target = url or creds.url or DEFAULT_URL
        # credentials come from the file; any userinfo in the URL would compete with them
        parsed = urlparse(target)
        netloc = parsed.hostname or "127.0.0.1"
        if parsed.port:
            netloc += f":{parsed.port}"
        target = urlunparse(parsed._replace(netloc=netloc))
        return await cls.connect(
            target, creds.tenant, creds.user, creds.password, timeout, give_up_after
        )

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self) -> TenantClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(self, verb: str, body: Any = None) -> Any:
        """One request to the gateway; the reply's data, or GatewayError/NotFound."""
        subject = subjects.api(self.tenant, verb)
        payload = codec.encode(body if body is not None else {})
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout)
        except NoRespondersError as exc:
            raise Unavailable(f"no engine serves {subject}: is the engine running?") from exc
        except (TimeoutError, NatsTimeoutError) as exc:
            raise GatewayError(
                "timeout",
                f"no answer on {subject} within {self.timeout:.0f}s (engine busy, or these "
                "credentials may not publish there)",
            ) from exc
        reply = codec.decode(msg.data, ApiReply)
        if reply.ok:
            return reply.data
        message = reply.error or reply.code or "request failed"
        if reply.code == "not_found":
            raise GatewayNotFound(message)
        if reply.code == "not_complete":
            raise GatewayNotComplete(message)
        raise GatewayError(reply.code or "error", message)

    # --- verbs ------------------------------------------------------------------------

    async def submit(self, spec: WorkflowSpec, workflow_id: str | None = None) -> str:
        """Submit a workflow as this tenant; returns its id (namespaced "<tenant>_…")."""
        if spec.tenant not in ("default", self.tenant):
            raise SpecError(
                [f"the spec's tenant {spec.tenant!r} is not this client's ({self.tenant!r})"]
            )
        validate(spec)
        datasets = {}
        for name, ds in spec.datasets.items():
            if ds.digest is not None:
                raise SpecError(
                    [f"dataset {name!r}: a digest cannot be submitted through the gateway"]
                )
            records = ds.records if ds.records is not None else read_records(ds.path or "")
            datasets[name] = DatasetSpec(records=records)
        inline = WorkflowSpec(
            name=spec.name,
            nodes=spec.nodes,
            datasets=datasets,
            tenant=self.tenant,
            dedup_scope=spec.dedup_scope,
        )
        request = SubmitRequest(spec=inline, workflow_id=workflow_id)
        size = len(codec.encode(request))
        if size > MAX_REQUEST_BYTES:
            raise SpecError(
                [
                    f"the workflow with its datasets inline is {size} bytes; the gateway "
                    f"takes at most {MAX_REQUEST_BYTES} (split the datasets, or ask the "
                    "operator to load them)"
                ]
            )
        try:
            data = await self.call("submit", request)
        except NotFound:
            raise
        except GatewayError as exc:
            if exc.code in ("bad_request", "too_large"):
                raise SpecError([str(exc)]) from exc
            raise
        return codec.convert(data, SubmitReply).workflow_id

    async def status(self, workflow_id: str) -> WorkflowStatus | None:
        try:
            data = await self.call("status", {"workflow_id": workflow_id})
        except NotFound:
            return None
        return codec.convert(data, WorkflowStatus)

    async def workflows(self, offset: int = 0, limit: int = LIST_PAGE) -> list[WorkflowSummary]:
        """A page of this tenant's workflows: the newest `limit` after skipping `offset`
        (oldest first within the page)."""
        page = await self.call("list", {"offset": offset, "limit": limit})
        return [codec.convert(d, WorkflowSummary) for d in page]

    async def wait(
        self,
        workflow_id: str,
        timeout: float | None = None,
        on_update: Callable[[WorkflowStatus], Any] | None = None,
        raise_on_failure: bool = True,
        poll_s: float = 0.5,
    ) -> WorkflowStatus:
        """Poll until the workflow completes or fails (tenants cannot watch the KV)."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        last: float | None = None
        while True:
            status = await self.status(workflow_id)
            if status is None:
                # the gateway answers submit once the planner accepted the workflow, or
                # after a while without it (engine restarting): give it that long again
                if time.monotonic() - started > ACCEPT_GRACE_S:
                    raise NotFound(f"no workflow {workflow_id!r}")
                await asyncio.sleep(poll_s)
                continue
            if on_update is not None and status.updated_at != last:
                on_update(status)
            last = status.updated_at
            if status.state == "failed" and raise_on_failure:
                raise WorkflowFailed(status)
            if status.state != "running":
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"workflow {workflow_id} still running after {timeout}s")
            await asyncio.sleep(poll_s)

    async def result(self, workflow_id: str, node: str) -> list[Record]:
        """A node's records in order, fetched page by page."""
        rows: list[Record] = []
        offset: int | None = 0
        while offset is not None:
            data = await self.call(
                "result", {"workflow_id": workflow_id, "node": node, "offset": offset}
            )
            page = codec.convert(data, ResultPage)
            rows.extend(page.records)
            offset = page.next_offset
        return rows

    async def lineage_page(
        self,
        workflow_id: str,
        node: str | None = None,
        page: LineageCursor | None = None,
        limit: int = LINEAGE_PAGE,
    ) -> Lineage:
        """One page of the workflow's (or a node's) lineage: every node's header and up
        to `limit` operators of the node `page` names (None: the first); `next_page`
        says where the next page starts. Other tenants' requests only counted."""
        req = LineageRequest(workflow_id=workflow_id, node=node, page=page, limit=limit)
        return codec.convert(await self.call("lineage", req), Lineage)

    async def lineage(
        self, workflow_id: str, node: str | None = None, per_node: int = 0
    ) -> Lineage:
        """The workflow's (or a node's) lineage, fetched a page at a time; per_node > 0:
        only the first `per_node` operators of each node."""

        async def fetch(cursor: LineageCursor | None, limit: int) -> Lineage:
            return await self.lineage_page(workflow_id, node, cursor, limit)

        return await collect_pages(fetch, per_node)

    async def cancel(self, workflow_id: str) -> str:
        """Cancel one of this tenant's running workflows; its state after the request."""
        data = await self.call("cancel", WorkflowRequest(workflow_id=workflow_id))
        return str(data["state"])

    async def cost(self, offset: int = 0, limit: int = LIST_PAGE) -> CostSummary:
        """The bills of a page of this tenant's workflows (newest first) and their sum."""
        data = await self.call("cost", {"offset": offset, "limit": limit})
        return codec.convert(data, CostSummary)
