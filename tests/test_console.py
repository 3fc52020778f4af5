"""The web console in headless Chromium, loaded while a workflow runs on a real fabric.

Chromium is Debian's (`scripts/setup.sh` installs it), driven by playwright without a
browser download. The page must follow the run live (over SSE, no reload): the workflow
appears running, its DAG fills in operator by operator, and it ends completed; the
workers are listed; clicking a node shows its operators' lineage.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.local import free_port
from flowmesh.engine.spec import parse_spec
from flowmesh.topics.messages import WorkflowSpec
from tests.conftest import REPO, MakeFabric, connect

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
N = 16


def slow_spec() -> WorkflowSpec:
    rows: list[dict[str, Any]] = [
        {"id": i, "text": f"item {i}", "colour": "red" if i % 3 else "blue"} for i in range(N)
    ]
    return parse_spec(
        {
            "name": "console-demo",
            "tenant": "acme",
            "datasets": {"src": {"records": rows}},
            "nodes": [
                {
                    "name": "slow",
                    "op": "map",
                    "fn": "test.slow_upper",
                    "input": "src",
                    "params": {"field": "text", "delay": 0.4},
                },
                {
                    "name": "count",
                    "op": "group",
                    "input": "slow",
                    "params": {"by": "colour", "agg": "count"},
                },
            ],
        }
    )


async def test_console_shows_the_live_run(
    make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (apt-get install chromium; scripts/setup.sh does)")
    port = free_port()
    monkeypatch.setenv("FLOWMESH_CONSOLE_PORT", str(port))  # read by `flowmesh engine`
    fabric = make_fabric(workers=2)
    url = f"http://127.0.0.1:{port}/"

    async with await connect(fabric, 2) as fm, playwright.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            await page.goto(url)
            await page.wait_for_selector("#live.on", timeout=30_000)  # SSE connected

            wf = await fm.submit(slow_spec())
            row = f'#workflows tr[data-wf="{wf}"]'
            # it appears on the open page while it runs
            await page.wait_for_selector(f'{row}[data-state="running"]', timeout=30_000)
            for wid in fabric.worker_ids:
                await page.wait_for_selector(f'#workers tr[data-worker="{wid}"]', timeout=30_000)
            dag = "#dag g.node"
            await page.wait_for_selector(f'{dag}[data-node="src"]', timeout=30_000)
            await page.wait_for_selector(f'{dag}[data-node="slow"]', timeout=30_000)
            running_counts = await page.text_content(f'{dag}[data-node="slow"] text.counts')
            assert running_counts.endswith(f"/{N} ops"), running_counts
            await page.screenshot(path=str(tmp_path / "console-running.png"), full_page=True)

            status = await fm.wait(wf, timeout=120)
            assert status.state == "completed"
            # the same page, never reloaded, follows the run to its end
            await page.wait_for_selector(f'{row}[data-state="completed"]', timeout=30_000)
            slow = f'{dag}[data-node="slow"] text.counts'
            await page.wait_for_function(
                "([sel, want]) => document.querySelector(sel)?.textContent === want",
                arg=[slow, f"{N}/{N} ops"],
                timeout=30_000,
            )
            assert await page.text_content(f'{dag}[data-node="count"] text.counts') == "1/1 ops"
            assert await page.inner_text(f"{row} td:nth-child(5)") == f"{N + 1}/{N + 1}"
            assert await page.inner_text('#tenants tr[data-tenant="acme"] td:first-child') == (
                "acme"
            )

            # lineage of a result: click the node, its operators are listed
            await page.click(f'{dag}[data-node="slow"]')
            await page.wait_for_function(
                "n => document.querySelectorAll('#lineage tr[data-op]').length === n",
                arg=N,
                timeout=30_000,
            )
            lineage_text = await page.inner_text("#lineage")
            assert f"{wf}:ran" in lineage_text
            assert any(wid in lineage_text for wid in fabric.worker_ids)

            shot = tmp_path / "console.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()

    assert shot.stat().st_size > 10_000
    keep = REPO / ".flowmesh"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "console.png")
    shutil.copy(tmp_path / "console-running.png", keep / "console-running.png")

    # the JSON endpoints behind the page
    def get(path: str) -> Any:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as r:
            return json.loads(r.read())

    one = get(f"/api/workflows/{wf}")
    assert one["state"] == "completed"
    assert [n["name"] for n in one["nodes"]] == ["src", "slow", "count"]
    assert {w["worker"] for w in get("/api/workers")} == set(fabric.worker_ids)
    assert get("/api/cost")["tenants"]["acme"]["ops"] == N + 1
    lineage = get(f"/api/workflows/{wf}/lineage?node=count")
    assert lineage["target"] == "count" and len(lineage["ops"]) == N + 1
    # a bad id is a clear 404, and the console (and the engine) carry on
    with pytest.raises(urllib.error.HTTPError) as err:
        get("/api/workflows/no-such-wf/lineage")
    assert err.value.code == 404
    assert "no-such-wf" in json.loads(err.value.read())["error"]
    assert fabric.alive()["engine"]


async def test_console_scans_are_shared_and_slow_ones_are_reused_longer(
    nats_url: str, tmp_path: Path
) -> None:
    """However many requests come in, the console scans the buckets at most once per
    interval, and a slow scan (a big fabric) is reused for 5x as long."""
    from flowmesh.engine.console import ConsoleServer
    from flowmesh.topics import Bus
    from flowmesh.topics.store.cas import open_cas

    bus = await Bus.connect(nats_url, "console-test")
    try:
        console = ConsoleServer(bus, await open_cas(str(tmp_path / "cas")), interval_s=0.05)
        first = await console.latest()
        assert await console.latest() is first  # within the interval: shared
        bill = await console.cost_report()
        assert await console.cost_report() is bill
        # the interval, or 5x the scan on a slow box
        assert console.reuse_s() >= 0.05
        await asyncio.sleep(console.reuse_s() + 0.05)
        second = await console.latest()
        assert second is not first  # that long passed: scanned again
        console._scan_s = 60.0  # as if the last scan had taken a minute
        await asyncio.sleep(0.1)
        assert await console.latest() is second
        assert await console.cost_report() is bill
    finally:
        await bus.close()
