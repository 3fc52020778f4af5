"""`flowmesh top` and the web console on a NATS fabric and on a Kafka-only one (issue 16:
"the same figures on both buses for the same workload").

The same workload runs on each fabric in turn: two tenants ask for the same work one after
the other (the second is served the first's results). Each fabric's figures are read three
ways: the snapshot behind both dashboards (engine/monitor.py), `flowmesh top --once`
(the command a user runs), and the console's JSON API (/api/snapshot, /api/workflows,
/api/cost). The counts that do not depend on timing (workflows and their states,
operators total/done/failed/reused per workflow and node, dedup roles, per-tenant
workflows and operators) must agree between the three readers and between the buses.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.monitor import snapshot
from flowmesh.topics.bus import transport
from tests.conftest import MakeFabric, connect
from tests.test_console_kafka_only import BEARER, TENANT_LOGIN, TOKEN
from tests.test_kafka_only import kafka_broker, kafka_only, make_kafka_only  # noqa: F401
from tests.test_top import spec, top_once

Figures = dict[str, Any]


# --- the same workload on both buses ----------------------------------------------------


def table_rows(text: str, first_cells: set[str]) -> dict[str, list[str]]:
    """The rows of top's tables whose first cell is one of `first_cells`, as cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] in first_cells:
            rows[cells[0]] = cells
    return rows


def figures(snap: dict[str, Any], bill: dict[str, Any] | None = None) -> Figures:
    """The deterministic counts of a snapshot (as the console's JSON gives it), with
    workflows named by tenant and name (their ids differ from run to run)."""
    out: Figures = {
        "workflows": {
            (w["tenant"], w["name"]): {
                "state": w["state"],
                "ops": (w["ops_total"], w["ops_done"], w["ops_failed"], w["ops_reused"]),
                "nodes": [
                    (n["name"], n["op"], n["total"], n["done"], n["failed"], n["reused"])
                    for n in w["nodes"]
                ],
            }
            for w in snap["workflows"]
        },
        "dedup": {k: snap["dedup"][k] for k in ("requests", "ran", "joined", "reused")},
        "tenants": {t["tenant"]: (t["workflows"], t["running"], t["ops"]) for t in snap["tenants"]},
        "operators": snap["operators"],
        "workers": len(snap["workers"]),
        "batches_in_flight": snap["batches_in_flight"],
    }
    if bill is not None:
        out["billed_ops"] = {t: b["ops"] for t, b in bill["tenants"].items()}
        out["billed_operators"] = bill["operators"]
    return out


async def run_and_read(fabric: LocalFabric, console_port: int, no_nats: bool) -> Figures:
    """Run the workload on `fabric`; its figures as the snapshot, `top --once` and the
    console read them, checked to agree with each other."""
    async with await connect(fabric, 2) as fm:
        first = await fm.submit(spec("acme"))
        assert (await fm.wait(first, timeout=180)).state == "completed"
        second = await fm.submit(spec("globex"))
        assert (await fm.wait(second, timeout=180)).state == "completed"
        # read once both workers' heartbeats are in the registry: one delayed past the
        # liveness window (a slow broker) gets its worker reclaimed until it beats again,
        # and the figures compared here are the workload's, not that moment's
        deadline = time.monotonic() + 30
        while len((top_snap := (await snapshot(fm.bus)).to_dict())["workers"]) < 2:
            assert time.monotonic() < deadline, top_snap["workers"]
            await asyncio.sleep(0.5)
    top = figures(top_snap)

    base = f"http://127.0.0.1:{console_port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def get(path: str, headers: dict[str, str] = BEARER) -> tuple[int, Any]:
            async with http.get(base + path, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        # the console reuses a snapshot for its interval: wait for one taken after the run
        deadline = time.monotonic() + 30
        while True:
            status, snap = await get("/api/snapshot")
            assert status == 200, snap
            status, bill = await get("/api/cost")
            assert status == 200, bill
            console = figures(snap, bill)
            if {k: console[k] for k in top} == top or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert {k: console[k] for k in top} == top
        # the console's bills count what its snapshot counts
        assert console["billed_operators"] == console["operators"]
        assert console["billed_ops"] == {t: ops for t, (_, _, ops) in console["tenants"].items()}

        status, rows = await get("/api/workflows")
        assert status == 200
        assert figures({**snap, "workflows": rows})["workflows"] == top["workflows"]
        by_id = {w["workflow_id"]: w for w in rows}
        assert {first, second} <= set(by_id)
        status, one = await get(f"/api/workflows/{first}")
        assert status == 200 and one == by_id[first]

        # no credential on a console with a token: refused on either bus
        assert (await get("/api/snapshot", headers={}))[0] == 401
        if no_nats:
            # a tenant's login: no nats-server to check it (on NATS, this test's server
            # has no auth, so it would take any password: tests/test_hostile_tenant.py
            # checks logins against one that has)
            status, body = await get("/api/snapshot", headers=TENANT_LOGIN)
            assert status == 401
            assert "Kafka-only" in body["error"], body
        # lineage on either bus: the nodes, each operator's state and who asked for it
        # (on Kafka-only its requests are read from the fm_requests changelog)
        status, lin = await get(f"/api/workflows/{second}/lineage")
        assert status == 200, lin
        assert lin["workflow_id"] == second
        top["lineage"] = lineage_figures(lin)

    # the command a user runs: the same workflows, tenants and dedup line
    text = top_once(fabric)
    d = top["dedup"]
    hit = (d["joined"] + d["reused"]) / d["requests"]
    line = (
        f"dedup hit rate {hit:.0%} ({d['joined']} joined, {d['reused']} reused of {d['requests']})"
    )
    assert line in text, text
    tenants = table_rows(text, set(top["tenants"]))
    for tenant, (n_wf, running, ops) in top["tenants"].items():
        assert tenants[tenant][1:4] == [str(n_wf), str(running), str(ops)], tenants[tenant]
    wfs = table_rows(text, {first, second})
    for wf_id in (first, second):
        w = by_id[wf_id]
        cells = wfs[wf_id]
        assert cells[3:6] == [w["state"], f"{w['ops_done']}/{w['ops_total']}", str(w["ops_reused"])]
    return top


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_top_and_console_show_the_same_figures_on_nats_and_kafka_only(
    make_fabric: MakeFabric,
    make_kafka_only: Any,  # noqa: F811
    kafka_only: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWMESH_CONSOLE_TOKEN", TOKEN)

    # NATS: streams and KV on the test's nats-server (the Kafka fixtures set the
    # environment for Kafka-only; this fabric's processes start before it applies)
    monkeypatch.setenv(transport.BUS_ENV, "nats")
    monkeypatch.setenv(transport.KV_ENV, "nats")
    port = free_port()
    monkeypatch.setenv("FLOWMESH_CONSOLE_PORT", str(port))  # read by `flowmesh engine`
    nats_fabric = make_fabric(workers=2)
    on_nats = await run_and_read(nats_fabric, port, no_nats=False)
    nats_fabric.stop()  # two cores: one fabric at a time

    # Kafka-only: no nats-server at all; the console is served all the same
    monkeypatch.setenv(transport.BUS_ENV, "kafka")
    monkeypatch.setenv(transport.KAFKA_ENV, kafka_only)
    monkeypatch.setenv(transport.KV_ENV, "kafka")
    port = free_port()
    monkeypatch.setenv("FLOWMESH_CONSOLE_PORT", str(port))
    kafka_fabric = make_kafka_only(workers=2)
    on_kafka = await run_and_read(kafka_fabric, port, no_nats=True)
    assert kafka_fabric.nats_proc is None
    logs = "".join(p.read_text() for p in (kafka_fabric.log_dir or Path()).glob("engine*.log"))
    assert "tenant gateway not started" in logs

    assert on_kafka == on_nats
    assert_the_workloads(on_nats)


def lineage_figures(lin: dict[str, Any]) -> list[tuple[str, int, int, list[tuple[str, ...]]]]:
    """Per node: its name, operators done and reused, and per operator (sorted) the
    tenants that asked for it and their roles, in the order they asked."""
    out = []
    for node in lin["nodes"]:
        asked = sorted(
            tuple(f"{r['tenant']}:{r['role']}" for r in lin["ops"][k]["requests"])
            for k in node["ops"]
        )
        out.append((node["name"], node["done"], node["reused"], asked))
    return out


def assert_the_workloads(figs: Figures) -> None:
    """13 operators each (12 maps and a count), the second tenant's all reused."""
    wf = figs["workflows"]
    assert wf[("acme", "top-acme")]["ops"] == (13, 13, 0, 0)
    assert wf[("globex", "top-globex")]["ops"] == (13, 13, 0, 13)
    assert figs["dedup"] == {"requests": 26, "ran": 13, "joined": 0, "reused": 13}
    assert figs["tenants"] == {"acme": (1, 0, 13), "globex": (1, 0, 13)}
    assert (figs["operators"], figs["workers"], figs["batches_in_flight"]) == (13, 2, 0)
    # globex's lineage: every operator ran for acme, reused by globex
    nodes = {name: (done, reused, asked) for name, done, reused, asked in figs["lineage"]}
    assert sum(done for done, _, _ in nodes.values()) == 13
    assert sum(reused for _, reused, _ in nodes.values()) == 13
    for _, _, asked in nodes.values():
        assert set(asked) == {("acme:ran", "globex:reused")}, asked


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_console_in_a_gateway_process_of_its_own_on_kafka_only(
    make_kafka_only: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`flowmesh up`'s layout (a planner shard, the scheduler and the gateway each in a
    process of its own): on Kafka-only the gateway process starts no tenant gateway but
    serves the console, whose figures are the same as above."""
    monkeypatch.setenv("FLOWMESH_CONSOLE_TOKEN", TOKEN)
    port = free_port()
    monkeypatch.setenv("FLOWMESH_CONSOLE_PORT", str(port))  # read by `flowmesh gateway`
    fabric = make_kafka_only(workers=2, planner_shards=1)
    assert fabric.gateway_proc is not None and fabric.engine_proc is None
    assert_the_workloads(await run_and_read(fabric, port, no_nats=True))
    logs = (fabric.log_dir or Path()).glob("gateway*.log")
    assert "tenant gateway not started" in "".join(p.read_text() for p in logs)
