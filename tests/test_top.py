"""`flowmesh top --once` and the snapshot behind it, against a real fabric."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.local import LocalFabric
from flowmesh.engine.monitor import snapshot
from flowmesh.topics import Bus, streams
from flowmesh.topics.messages import WorkflowSpec
from tests.conftest import MakeFabric, connect
from tests.workflows import map_then_count

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def top_once(fabric: LocalFabric) -> str:
    """What `flowmesh top --once` prints for the fabric (its bus from the environment)."""
    out = subprocess.run(
        [sys.executable, "-m", "flowmesh.engine.cli", "top", "--once", "--nats", fabric.nats_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def spec(tenant: str, n: int = 12) -> WorkflowSpec:
    rows: list[dict[str, Any]] = [
        {"id": i, "text": f"item {i}", "colour": "red" if i % 3 else "blue"} for i in range(n)
    ]
    return map_then_count(f"top-{tenant}", rows, "text.upper", node="upper", tenant=tenant)


async def test_top_once_shows_streams_workers_and_tenants(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    async with await connect(fabric, 2) as fm:
        first = await fm.submit(spec("acme"))
        await fm.wait(first, timeout=120)
        # the same work for another tenant: served from acme's results (global dedup)
        second = await fm.submit(spec("globex"))
        await fm.wait(second, timeout=120)

        snap = await snapshot(fm.bus)

    # the snapshot: what both dashboards render
    assert {s.name for s in snap.streams} >= {streams.STREAM_READY, streams.STREAM_ASSIGN}
    assert {c.name for c in snap.consumers} >= {streams.SCHEDULER, streams.PLANNER_DONE}
    assert sorted(w.worker for w in snap.workers) == sorted(fabric.worker_ids)
    assert {w.device_class for w in snap.workers} == {"cpu"}
    by_wf = {w.workflow_id: w for w in snap.workflows}
    assert by_wf[first].state == by_wf[second].state == "completed"
    assert by_wf[first].ops_done == by_wf[first].ops_total == 13
    assert by_wf[second].ops_reused == 13
    nodes = {n.name: n for n in by_wf[first].nodes}
    assert nodes["src"].op == "dataset" and nodes["upper"].inputs == ["src"]
    assert nodes["count"].inputs == ["upper"] and nodes["count"].done == 1
    # 26 requests, 13 ran (acme), 13 reused (globex)
    assert (snap.dedup.requests, snap.dedup.ran, snap.dedup.reused) == (26, 13, 13)
    assert snap.dedup.hit_rate == pytest.approx(0.5)
    tenants = {t.tenant: t for t in snap.tenants}
    assert set(tenants) == {"acme", "globex"}
    # the fleet's cost is split between the two tenants that asked for the same work
    assert tenants["acme"].paid_usd > 0 and tenants["globex"].paid_usd > 0
    assert tenants["acme"].paid_usd + tenants["globex"].paid_usd == pytest.approx(snap.total_usd)
    assert tenants["acme"].ops_recent == tenants["globex"].ops_recent == 13

    # the command a user runs
    text = top_once(fabric)
    for expected in [
        "streams",
        "consumer lag",
        streams.STREAM_READY,
        streams.STREAM_ASSIGN,
        streams.SCHEDULER,
        *fabric.worker_ids,
        "acme",
        "globex",
        first,
        second,
        "dedup hit rate 50%",
    ]:
        assert expected in text, f"{expected!r} missing from:\n{text}"


async def test_snapshot_survives_an_undecodable_entry(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test-top")
    try:
        kv = await bus.kv(streams.KV_WF)
        await kv.put("wf-garbage", b"{not json")
        snap = await snapshot(bus)
    finally:
        await bus.close()
    # the console still renders; the bad entry is named, not silently dropped
    assert snap.workflows == []
    assert any("wf-garbage" in e for e in snap.errors)
