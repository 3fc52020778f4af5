"""`flowmesh.Client` as a tenant, through the gateway: the same calls and types as over
the bus, the tenant's own view, and the same errors (on the tenancy tests' fabric)."""

from __future__ import annotations

import uuid

import pytest

from flowmesh import (
    Client,
    CostSummary,
    GatewayError,
    Lineage,
    LineageCursor,
    NotFound,
    SpecError,
)
from tests.test_tenancy import AuthFabric, auth_fabric, spec

__all__ = ["auth_fabric"]  # the module-scoped fabric with tenants a and b

pytestmark = pytest.mark.slow


async def test_client_through_the_gateway(auth_fabric: AuthFabric) -> None:
    nonce = uuid.uuid4().hex[:8]
    async with await Client.connect(tenant_creds=auth_fabric.creds("a"), timeout=60) as a:
        assert (a.via, a.tenant) == ("gateway", "a")
        wf = await a.submit(spec("via-client", nonce))
        assert wf.startswith("a_")
        status = await a.wait(wf, timeout=120)
        assert status.state == "completed" and status.tenant == "a"
        assert len(await a.result(wf, "upper")) == 6
        with pytest.raises(NotFound):
            await a.result(wf, "nope")
        with pytest.raises(NotFound):
            await a.status("a_wf-missing")
        summary = next(s for s in await a.workflows() if s.workflow_id == wf)
        assert (summary.tenant, summary.ops_done) == ("a", summary.ops_total)
        lineage = await a.lineage(wf, "count")
        assert isinstance(lineage, Lineage) and lineage.workflow_id == wf
        # served a page at a time: two of upper's six operators, then the next two
        first = await a.lineage_page(wf, limit=2)
        assert first.paged and [n.name for n in first.nodes] == ["upper", "count"]
        assert len(first.node("upper").ops) == 2 and first.node("upper").n_ops == 6
        assert first.next_page == LineageCursor(node="upper", offset=2)
        second = await a.lineage_page(wf, page=first.next_page, limit=2)
        assert not set(second.ops) & set(first.ops) and len(second.ops) == 2
        # all of them add up to the whole graph, linked down to the dataset
        assert {n.name: len(n.ops) for n in lineage.nodes} == {"upper": 6, "count": 1}
        (group,) = lineage.node("count").ops
        assert set(lineage.ops[group].upstream) == set(lineage.node("upper").ops)
        with pytest.raises(NotFound):
            await a.lineage_page(wf, page=LineageCursor(node="nope"))
        cost = await a.cost()
        assert isinstance(cost, CostSummary) and set(cost.tenants) <= {"a"}
        assert wf in cost.workflows
        with pytest.raises(SpecError, match="acts as tenant 'a'"):
            await a.submit(spec("as-b", nonce), tenant="b")
    async with await Client.connect(tenant_creds=auth_fabric.creds("b"), timeout=60) as b:
        with pytest.raises(NotFound) as other:
            await b.result(wf, "upper")
        assert isinstance(other.value, GatewayError)  # and a gateway refusal
        assert wf not in {s.workflow_id for s in await b.workflows()}
