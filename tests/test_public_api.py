"""`flowmesh`'s public names, and `flowmesh.Client` against a real fabric: the same calls
and typed results over the bus, the same errors, an unreachable server reported quickly,
and a client that agrees with the fabric on where the data is."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flowmesh
from flowmesh import (
    Client,
    CostSummary,
    DataDirMismatch,
    FlowMeshError,
    Lineage,
    NotComplete,
    NotFound,
    Settings,
    Unavailable,
    WorkflowSummary,
)
from flowmesh.engine.local import free_port
from tests.conftest import MakeFabric
from tests.workflows import map_then_count

REPO = Path(__file__).resolve().parent.parent

# Adding a public name is a decision: add it here too. Removing one breaks users.
PUBLIC = [
    "Bill",
    "Client",
    "CostSummary",
    "DataDirMismatch",
    "DatasetSpec",
    "FlowMeshError",
    "GatewayError",
    "Lineage",
    "LineageCursor",
    "LineageDataset",
    "LineageNode",
    "LineageOp",
    "NodeSpec",
    "NodeStatus",
    "NotComplete",
    "NotFound",
    "OpFailure",
    "Settings",
    "SettingsError",
    "SpecError",
    "Unavailable",
    "WaitTimeout",
    "WorkflowFailed",
    "WorkflowSpec",
    "WorkflowStatus",
    "WorkflowSummary",
    "__version__",
    "load_spec",
]


def test_public_names_are_all_in_all_and_resolve() -> None:
    assert flowmesh.__all__ == PUBLIC
    for name in flowmesh.__all__:
        value = getattr(flowmesh, name)
        if name != "__version__":
            assert value.__module__.startswith("flowmesh."), name
    # nothing public that __all__ does not name (sub-packages aside)
    subpackages = {"client", "configs", "engine", "loadgen", "topics", "workers"}
    extra = {n for n in dir(flowmesh) if not n.startswith("_")} - set(PUBLIC) - subpackages
    assert extra == set()


def test_every_error_is_a_flowmesh_error() -> None:
    errors = [getattr(flowmesh, n) for n in PUBLIC if n.endswith(("Error", "Mismatch"))]
    errors += [flowmesh.NotFound, flowmesh.NotComplete, flowmesh.Unavailable]
    errors += [flowmesh.WaitTimeout, flowmesh.WorkflowFailed]
    for err in errors:
        assert issubclass(err, FlowMeshError), err
    # and the standard kinds callers already catch
    assert issubclass(flowmesh.NotFound, LookupError)
    assert issubclass(flowmesh.WaitTimeout, TimeoutError)
    assert issubclass(flowmesh.SpecError, ValueError)


def test_the_tenant_client_loads_no_engine_internals() -> None:
    """The gateway client speaks the contract's wire types: importing it loads neither
    the engine's lineage, cost nor gateway, and no FlowMesh module it loads uses rich."""
    code = (
        "import sys, flowmesh.engine.tenant_client, flowmesh;"
        "flowmesh.Client;"
        "print('\\n'.join(m for m in sys.modules if m.startswith('flowmesh')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not {"flowmesh.engine.lineage", "flowmesh.engine.cost", "flowmesh.engine.gateway"} & set(
        out
    )
    for module in out:
        path = sys.modules[module].__file__ if module in sys.modules else None
        if path is None:
            import importlib

            path = importlib.import_module(module).__file__
        assert path is not None
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.col_offset == 0 and node.module:
                assert not node.module.startswith("rich"), f"{module} imports {node.module}"


async def test_unreachable_nats_fails_fast_with_a_clear_error() -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"no NATS server reachable at 127\.0\.0\.1"):
        await Client.connect(url, settings=Settings(connect_timeout=1))
    assert time.monotonic() - started < 10


@pytest.mark.slow
async def test_client_over_the_bus(make_fabric: MakeFabric, tmp_path: Path) -> None:
    fabric = make_fabric(workers=1)
    rows = [{"text": f"item {i}", "colour": "red" if i % 2 else "blue"} for i in range(6)]
    spec = map_then_count("client-api", rows, "text.upper", tenant="acme")
    # no CAS given: the client uses the one the fabric recorded, from any folder
    async with await Client.connect(fabric.nats_url, settings=Settings()) as client:
        assert client.via == "bus" and client.tenant is None
        wf = await client.submit(spec)
        with pytest.raises(NotFound):
            await client.status("wf-nosuchworkflow")
        status = await client.wait(wf, timeout=120)
        assert status.state == "completed"
        assert [r["text"] for r in await client.result(wf, "up")] == [f"ITEM {i}" for i in range(6)]
        with pytest.raises(NotFound, match="no node"):
            await client.result(wf, "nope")
        summaries = await client.workflows()
        assert all(isinstance(s, WorkflowSummary) for s in summaries)
        mine = next(s for s in summaries if s.workflow_id == wf)
        assert (mine.tenant, mine.ops_done, mine.ops_total) == ("acme", 7, 7)
        lineage = await client.lineage(wf, "count")
        assert isinstance(lineage, Lineage) and lineage.workflow_id == wf
        assert {n.name for n in lineage.nodes} == {"up", "count"}
        assert all(op.state == "done" for op in lineage.ops.values())
        cost = await client.cost()
        assert isinstance(cost, CostSummary)
        assert cost.workflows[wf].tenant == "acme" and cost.tenants["acme"].ops == 7
        # a slow one is not complete yet: NotComplete, not a stray RuntimeError
        slow = map_then_count("client-slow", rows, "test.slow_upper", delay=2.0, count=None)
        wf2 = await client.submit(slow)
        for _ in range(100):  # accepted by the planner (submit returns before)
            try:
                await client.status(wf2)
                break
            except NotFound:
                await asyncio.sleep(0.1)
        with pytest.raises(NotComplete):
            await client.result(wf2, "up")

    # another data directory than the fabric's: refused, naming both
    with pytest.raises(DataDirMismatch, match=str(tmp_path / "data" / "cas")):
        await Client.connect(fabric.nats_url, data_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_readme_lists_every_builtin_fn() -> None:
    from flowmesh.workers.fns import fn_table

    readme = (REPO / "README.md").read_text()
    start, end = readme.index("<!-- fns:start -->\n"), readme.index("<!-- fns:end -->")
    assert readme[start + len("<!-- fns:start -->\n") : end] == fn_table(), (
        "README's fn table is stale: paste `flowmesh-worker --list-fns` between the markers"
    )


def test_readme_lists_every_variable() -> None:
    """The README's table is the settings module's, and every FLOWMESH_* variable the
    code reads is in it."""
    import re

    from flowmesh.topics.config.settings import settings_table

    readme = (REPO / "README.md").read_text()
    start, end = readme.index("<!-- settings:start -->\n"), readme.index("<!-- settings:end -->")
    table = readme[start + len("<!-- settings:start -->\n") : end]
    assert table == settings_table(), "paste `flowmesh settings --table` between the markers"
    used = set()
    for root in ["engine", "topics", "workers", "sdk", "loadgen"]:
        for path in (REPO / root).rglob("*.py"):
            used |= set(re.findall(r"[\"$](FLOWMESH_[A-Z0-9_]*[A-Z0-9])\b", path.read_text()))
    assert {v for v in used if f"`{v}`" not in table} == set()
