"""`flowmesh.Client`: one client for FlowMesh, over the bus or through the gateway.

    async with await Client.connect() as client:                 # the bus ($FLOWMESH_NATS)
    async with await Client.connect(tenant_creds="acme.json") as client:  # the gateway

Both ways take the same calls and return the same types: `submit` -> workflow id,
`status` -> WorkflowStatus, `workflows` -> [WorkflowSummary], `wait` -> WorkflowStatus,
`result` -> records, `lineage` -> Lineage, `cost` -> CostSummary; and raise the same
errors (flowmesh.FlowMeshError and its subclasses). On the bus the client sees every
tenant's workflows (an operator's view); through the gateway, only its own tenant's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import msgspec

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.spec import SpecError, load_spec
from flowmesh.engine.tenant_client import TenantClient
from flowmesh.topics import codec
from flowmesh.topics.api import (
    LINEAGE_PAGE,
    Bill,
    CostSummary,
    Lineage,
    LineageCursor,
    WorkflowSummary,
)
from flowmesh.topics.config.creds import resolve_url
from flowmesh.topics.config.settings import Settings
from flowmesh.topics.errors import NotFound
from flowmesh.topics.messages import WorkflowSpec, WorkflowStatus
from flowmesh.topics.store.cas import Record

Spec = WorkflowSpec | str | Path


class Client:
    """Use `await Client.connect(...)`; close it with `await client.close()` or
    `async with`."""

    def __init__(self, direct: FlowMesh | None = None, gateway: TenantClient | None = None):
        if (direct is None) == (gateway is None):
            raise ValueError("a Client talks to the bus or to the gateway: give one of them")
        self._direct = direct
        self._gateway = gateway

    @classmethod
    async def connect(
        cls,
        nats: str | None = None,
        *,
        tenant_creds: str | Path | None = None,
        creds: str | Path | None = None,
        cas: str | None = None,
        data_dir: str | Path | None = None,
        timeout: float = 30.0,
        settings: Settings | None = None,
    ) -> Client:
        """Connect to a running fabric.

        nats: server URL (default: settings, i.e. $FLOWMESH_NATS or nats://127.0.0.1:4222).
        tenant_creds: a tenant's credentials file (`flowmesh auth init`): talk to the
            gateway as that tenant; its URL is in the file.
        creds: the fabric's credentials file, for the bus on a server that requires them.
        cas / data_dir: the CAS to use on the bus; by default the one the running fabric
            recorded. One that differs from the fabric's raises DataDirMismatch.
        timeout: seconds a gateway request may take.
        Raises Unavailable when no NATS server answers in settings.connect_timeout."""
        settings = (settings or Settings.load()).updated(
            nats=nats,
            cas=cas,
            data_dir=str(data_dir) if data_dir is not None else None,
            creds=str(creds) if creds is not None else None,
        )
        if tenant_creds is not None:
            gateway = await TenantClient.from_creds(
                tenant_creds, url=nats, timeout=timeout, give_up_after=settings.connect_timeout
            )
            return cls(gateway=gateway)
        url = resolve_url(settings.nats, settings.creds)
        return cls(direct=await FlowMesh.connect(url, settings=settings))

    @property
    def via(self) -> Literal["bus", "gateway"]:
        return "bus" if self._direct is not None else "gateway"

    @property
    def tenant(self) -> str | None:
        """The tenant this client acts as (through the gateway), or None (the bus)."""
        return self._gateway.tenant if self._gateway is not None else None

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()
        if self._gateway is not None:
            await self._gateway.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _backend(self) -> FlowMesh | TenantClient:
        if self._direct is not None:
            return self._direct
        assert self._gateway is not None
        return self._gateway

    # --- the calls ------------------------------------------------------------------

    async def submit(
        self, spec: Spec, workflow_id: str | None = None, *, tenant: str | None = None
    ) -> str:
        """Validate, upload the datasets and submit; returns the workflow id. `spec` is a
        WorkflowSpec or the path of a YAML spec. Submitting an id again runs it once.
        Raises SpecError with every problem of an invalid spec, before anything is sent."""
        if not isinstance(spec, WorkflowSpec):
            spec = load_spec(spec)
        if self._direct is not None:
            return await self._direct.submit(spec, workflow_id, tenant=tenant)
        assert self._gateway is not None
        if tenant is not None and tenant != self._gateway.tenant:
            raise SpecError(
                [f"this client acts as tenant {self._gateway.tenant!r}, not {tenant!r}"]
            )
        # the credentials name the tenant, whatever the spec file says
        spec = msgspec.structs.replace(spec, tenant=self._gateway.tenant)
        return await self._gateway.submit(spec, workflow_id)

    async def status(self, workflow_id: str) -> WorkflowStatus:
        """The workflow's status, per node. NotFound if there is none (for this tenant)."""
        backend = self._backend()
        status = await backend.status(workflow_id)
        if status is None:
            raise NotFound(f"no workflow {workflow_id!r}")
        return status

    async def workflows(self) -> list[WorkflowSummary]:
        """Every workflow (of this tenant, through the gateway), oldest first."""
        if self._gateway is not None:
            return await self._gateway.workflows()
        assert self._direct is not None
        return [
            WorkflowSummary(
                workflow_id=s.workflow_id,
                name=s.name,
                state=s.state,
                submitted_at=s.submitted_at,
                ended_at=s.ended_at,
                ops_total=sum(n.total for n in s.nodes.values()),
                ops_done=sum(n.done for n in s.nodes.values()),
                tenant=s.tenant,
            )
            for s in await self._direct.workflows()
        ]

    async def wait(
        self,
        workflow_id: str,
        timeout: float | None = None,
        on_update: Callable[[WorkflowStatus], Any] | None = None,
        raise_on_failure: bool = True,
    ) -> WorkflowStatus:
        """Until the workflow completes (or fails: WorkflowFailed, unless
        raise_on_failure is False); WaitTimeout after `timeout` seconds."""
        backend = self._backend()
        return await backend.wait(workflow_id, timeout, on_update, raise_on_failure)

    async def result(self, workflow_id: str, node: str) -> list[Record]:
        """The records a node produced, in input order. NotFound (no such workflow or
        node), NotComplete (not finished yet)."""
        backend = self._backend()
        return await backend.result(workflow_id, node)

    async def lineage(self, workflow_id: str, node: str | None = None) -> Lineage:
        """The operators behind a workflow (or one node and its ancestors), down to the
        source datasets; through the gateway, other tenants' requests only counted. The
        gateway serves it a page at a time (`lineage_page`); this fetches every page."""
        if self._gateway is not None:
            return await self._gateway.lineage(workflow_id, node)
        assert self._direct is not None
        from flowmesh.engine.lineage import LineageError, build_lineage

        try:
            lin = await build_lineage(self._direct, workflow_id, node)
        except LineageError as exc:
            raise NotFound(str(exc)) from exc
        return lin

    async def lineage_page(
        self,
        workflow_id: str,
        node: str | None = None,
        page: LineageCursor | None = None,
        limit: int = LINEAGE_PAGE,
    ) -> Lineage:
        """One page of the lineage: every node's header and up to `limit` operators of
        the node `page` names (None: the first), from its offset; `next_page` says where
        the next one starts (None: the last). What a page reads grows with the page."""
        if self._gateway is not None:
            return await self._gateway.lineage_page(workflow_id, node, page, limit)
        assert self._direct is not None
        from flowmesh.engine.lineage import LineageError
        from flowmesh.engine.lineage.pages import build_lineage_page

        try:
            return await build_lineage_page(self._direct, workflow_id, node, page, limit)
        except LineageError as exc:
            raise NotFound(str(exc)) from exc

    async def cost(self) -> CostSummary:
        """Bills per tenant and per workflow (through the gateway: this tenant's)."""
        if self._gateway is not None:
            return await self._gateway.cost()
        assert self._direct is not None
        from flowmesh.engine.cost import cost_report

        report = await cost_report(self._direct.bus)
        return CostSummary(
            tenants={t: codec.convert(b.as_dict(), Bill) for t, b in report.tenants.items()},
            workflows={w: codec.convert(b.as_dict(), Bill) for w, b in report.workflows.items()},
        )
