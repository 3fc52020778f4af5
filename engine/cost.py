"""Cost and energy attribution: who paid for what, and what sharing saved them.

Every committed operator carries its device-seconds (its share of the batch it ran in)
times its worker class's $/h and busy watts (workers/runtime.py). A shared operator's cost
is split evenly among every workflow that asked for it, whether it ran for them, they
joined it in flight, or they reused it after it committed (engine/planner/ records each
request). A workflow's bill therefore goes down when a later workflow reuses its
results: the service is shared, and so is its cost. The split always adds up to the
device cost actually spent.

What dedup saved a workflow is what its operators would have cost it alone, minus its
share. (Operators invalidated from the cache drop out of the report with their entry.)
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field

import click
from rich.console import Console
from rich.table import Table

from flowmesh.engine.cli_options import _run, connect_timeout, nats_option, stdout
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.messages import OpRequest, OpState, WorkflowStatus


@dataclass
class Bill:
    """One workflow's or one tenant's account."""

    name: str
    tenant: str
    ops: int = 0  # operators it asked for
    ran: int = 0  # of which its own request started
    shared: int = 0  # of which others also asked for (joined in flight or reused)
    device_seconds: float = 0.0
    paid_usd: float = 0.0
    paid_energy_j: float = 0.0
    alone_usd: float = 0.0  # the full cost of every operator it asked for
    alone_energy_j: float = 0.0
    workflows: int = 0

    @property
    def saved_usd(self) -> float:
        return self.alone_usd - self.paid_usd

    @property
    def saved_energy_j(self) -> float:
        return self.alone_energy_j - self.paid_energy_j

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "workflows": self.workflows,
            "ops": self.ops,
            "ran": self.ran,
            "shared": self.shared,
            "device_seconds": self.device_seconds,
            "paid_usd": self.paid_usd,
            "paid_energy_j": self.paid_energy_j,
            "alone_usd": self.alone_usd,
            "alone_energy_j": self.alone_energy_j,
            "saved_usd": self.saved_usd,
            "saved_energy_j": self.saved_energy_j,
        }


@dataclass
class CostReport:
    workflows: dict[str, Bill] = field(default_factory=dict)
    tenants: dict[str, Bill] = field(default_factory=dict)
    total_usd: float = 0.0  # what the fleet actually spent on these operators
    total_energy_j: float = 0.0
    total_device_seconds: float = 0.0
    operators: int = 0
    # what workers spent for batches but billed to no one: warm-up, waiting for a core
    # (OpState.overhead_seconds, workers/billing.py); the fleet's, not a tenant's
    overhead_device_seconds: float = 0.0
    overhead_usd: float = 0.0
    overhead_energy_j: float = 0.0


async def kv_values(bus: Bus, bucket: str) -> dict[str, bytes]:
    """Every live key of a bucket with its value, in one pass."""
    return {key: value for key, value, _ in await bus.kv_items(bucket)}


def attribute(
    states: list[OpState], requests: list[OpRequest], statuses: dict[str, WorkflowStatus]
) -> CostReport:
    """Pure: split each committed operator's cost among the workflows that asked for it."""
    from flowmesh.engine.lineage.reads import requesters

    report = CostReport()
    by_key: dict[str, list[OpRequest]] = defaultdict(list)
    for req in requests:
        by_key[req.key].append(req)
    for st in states:
        if st.state == "pending":
            continue
        # the workflow that ran it comes from its entry (its `ran` request is recorded
        # per wave, which a lookup by key does not find), the others from their records
        askers = {r.workflow_id: r for r in requesters(st, by_key.get(st.key, []))}
        report.operators += 1
        report.total_usd += st.cost_usd
        report.total_energy_j += st.energy_j
        report.total_device_seconds += st.device_seconds
        report.overhead_device_seconds += st.overhead_seconds
        report.overhead_usd += st.overhead_seconds * st.price_per_hour / 3600.0
        report.overhead_energy_j += st.overhead_seconds * st.watts
        n = len(askers)
        for wf_id, req in askers.items():
            status = statuses.get(wf_id)
            bill = report.workflows.setdefault(
                wf_id, Bill(name=status.name if status else wf_id, tenant=req.tenant, workflows=1)
            )
            bill.ops += 1
            bill.ran += req.role == "ran"
            bill.shared += n > 1
            bill.device_seconds += st.device_seconds / n
            bill.paid_usd += st.cost_usd / n
            bill.paid_energy_j += st.energy_j / n
            bill.alone_usd += st.cost_usd
            bill.alone_energy_j += st.energy_j
    for bill in report.workflows.values():
        t = report.tenants.setdefault(bill.tenant, Bill(name=bill.tenant, tenant=bill.tenant))
        t.workflows += 1
        for attr in ("ops", "ran", "shared"):
            setattr(t, attr, getattr(t, attr) + getattr(bill, attr))
        for attr in ("device_seconds", "paid_usd", "paid_energy_j", "alone_usd", "alone_energy_j"):
            setattr(t, attr, getattr(t, attr) + getattr(bill, attr))
    return report


async def cost_report(bus: Bus) -> CostReport:
    from flowmesh.engine.lineage.reads import all_requests

    states = [codec.decode(v, OpState) for v in (await kv_values(bus, streams.KV_OPS)).values()]
    requests = await all_requests(bus)
    statuses = {
        k: codec.decode(v, WorkflowStatus) for k, v in (await kv_values(bus, streams.KV_WF)).items()
    }
    return attribute(states, requests, statuses)


async def workflows_cost(bus: Bus, workflow_ids: list[str]) -> CostReport:
    """The bills of these workflows, read from their own records only: the operators
    each asked for (KV fm_requests filtered by workflow id, on the server), everyone who
    asked for those (the split), and those operators' states. Its cost grows with these
    workflows' operators, not with the fleet's three buckets as cost_report's does (8 of
    those at once took 61 s and 1.5 GB on a busy fabric)."""
    from flowmesh.engine.lineage.reads import (
        decode_requests,
        op_state,
        requests_of_ops,
        workflow_status,
    )

    statuses: dict[str, WorkflowStatus] = {}
    for wf in workflow_ids:
        status = await workflow_status(bus, wf)
        if status is not None:
            statuses[wf] = status
    patterns = [f"*.{wf}" for wf in sorted(statuses)]
    entries = await bus.kv_select(streams.KV_REQUESTS, patterns)
    keys = {r.key for r in decode_requests(entries)}
    ordered = sorted(keys)
    sem = asyncio.Semaphore(64)

    async def state(key: str) -> OpState | None:
        async with sem:
            return await op_state(bus, key)

    found = dict(zip(ordered, await asyncio.gather(*(state(k) for k in ordered)), strict=True))
    of_ops = await requests_of_ops(bus, ordered, found)
    requests = [r for reqs in of_ops.values() for r in reqs]
    states = [s for s in found.values() if s is not None]
    return attribute(states, requests, statuses)


def render(report: CostReport, tenant: str | None, console: Console) -> None:
    def table(title: str, bills: list[Bill], first: str) -> Table:
        t = Table(title=title)
        for col in (
            first,
            "tenant",
            "ops",
            "shared",
            "device s",
            "paid $",
            "alone $",
            "saved $",
            "paid kJ",
            "saved kJ",
        ):
            t.add_column(col, justify="left" if col in (first, "tenant") else "right")
        for b in bills:
            t.add_row(
                b.name,
                b.tenant,
                str(b.ops),
                str(b.shared),
                f"{b.device_seconds:.2f}",
                f"{b.paid_usd:.6f}",
                f"{b.alone_usd:.6f}",
                f"{b.saved_usd:.6f}",
                f"{b.paid_energy_j / 1000:.3f}",
                f"{b.saved_energy_j / 1000:.3f}",
            )
        return t

    wfs = [b for b in report.workflows.values() if tenant is None or b.tenant == tenant]
    tenants = [b for b in report.tenants.values() if tenant is None or b.tenant == tenant]
    console.print(table("per workflow", sorted(wfs, key=lambda b: (b.tenant, b.name)), "workflow"))
    console.print(table("per tenant", sorted(tenants, key=lambda b: b.name), "tenant"))
    console.print(
        f"fleet spent ${report.total_usd:.6f}, {report.total_energy_j / 1000:.3f} kJ, "
        f"{report.total_device_seconds:.2f} device-seconds on {report.operators} operators, "
        f"billed to the workflows above; fleet overhead (warm-up, contention) "
        f"${report.overhead_usd:.6f}, {report.overhead_device_seconds:.2f} device-seconds"
    )


@click.command("cost")
@nats_option
@click.option("--tenant", default=None, help="only this tenant's workflows")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cost_command(nats_url: str, tenant: str | None, as_json: bool) -> None:
    """What each tenant and workflow paid, and what sharing saved it."""

    async def go() -> CostReport:
        bus = await Bus.connect(nats_url, "flowmesh-cost", give_up_after=connect_timeout())
        try:
            return await cost_report(bus)
        finally:
            await bus.close()

    report = _run(go)
    if as_json:
        workflows = {k: b for k, b in report.workflows.items() if tenant in (None, b.tenant)}
        tenants = {k: b for k, b in report.tenants.items() if tenant in (None, k)}
        out = {
            "workflows": {k: {"id": k, **b.as_dict()} for k, b in workflows.items()},
            "tenants": {k: b.as_dict() for k, b in tenants.items()},
            "total_usd": report.total_usd,
            "total_energy_j": report.total_energy_j,
            "total_device_seconds": report.total_device_seconds,
            "operators": report.operators,
            "overhead_device_seconds": report.overhead_device_seconds,
            "overhead_usd": report.overhead_usd,
            "overhead_energy_j": report.overhead_energy_j,
        }
        click.echo(json.dumps(out))
        return
    render(report, tenant, stdout)
