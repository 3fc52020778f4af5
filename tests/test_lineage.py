"""Lineage of results on a real nats-server with real engine and worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from flowmesh.engine import lineage
from flowmesh.engine.client import FlowMesh
from flowmesh.engine.lineage import (
    DATASET_PREFIX,
    NODE_PREFIX,
    PRODUCER,
    SCHEMA_URL,
    Lineage,
    LineageError,
    build_lineage,
    op_run_id,
    openlineage_events,
    render,
    workflow_run_id,
)
from flowmesh.engine.lineage import pages as lineage_pages
from flowmesh.engine.lineage.pages import build_lineage_page
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import codec, streams
from flowmesh.topics.api import LineageCursor
from flowmesh.topics.lineage import collect_pages
from flowmesh.topics.messages import WorkflowSpec, WorkflowStatus
from tests.conftest import MakeFabric, connect

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def records(ids: range) -> list[dict[str, Any]]:
    return [
        {"id": i, "text": f"item {i} is {'red' if i % 3 else 'blue'}", "colour": "x"} for i in ids
    ]


def chain(name: str, rows: list[dict[str, Any]], tenant: str = "default") -> WorkflowSpec:
    """map text.upper -> filter text.contains RED -> group by colour."""
    return parse_spec(
        {
            "name": name,
            "tenant": tenant,
            "datasets": {"src": {"records": rows}},
            "nodes": [
                {
                    "name": "upper",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "src",
                    "params": {"field": "text"},
                },
                {
                    "name": "reds",
                    "op": "filter",
                    "fn": "text.contains",
                    "input": "upper",
                    "params": {"field": "text", "substring": "RED"},
                },
                {
                    "name": "count",
                    "op": "group",
                    "input": "reds",
                    "params": {"by": "colour", "agg": "count"},
                },
            ],
        }
    )


def walk_to_sources(lin: Lineage, key: str) -> set[str]:
    """The dataset refs an operator's upstream chain ends in (asserting it never breaks)."""
    ends: set[str] = set()
    todo, seen = [key], set()
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        op = lin.ops[k]
        assert op.upstream, f"{op.node} op {k[:12]} has no upstream"
        for ref in op.upstream:
            if ref.startswith(DATASET_PREFIX):
                ends.add(ref)
            else:
                todo.append(ref)
    return ends


async def test_lineage_walks_down_to_the_source_dataset(
    make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    fabric = make_fabric(workers=2)
    rows = records(range(24))
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(chain("walk", rows))
        await fm.wait(wf, timeout=60)
        lin = await build_lineage(fm, wf, "count")
        upper_only = await build_lineage(fm, wf, "upper")
        src_records = await fm.cas.get_manifest((await fm.status(wf)).datasets["src"])  # type: ignore[union-attr]

        assert [n.name for n in lin.nodes] == ["upper", "reds", "count"]
        assert [d.name for d in lin.datasets] == ["src"]
        assert not lin.partial and lin.state == "completed" and not lin.warnings
        assert all(not n.inputs_inferred for n in lin.nodes)
        assert [n.inputs for n in lin.nodes] == [["src"], ["upper"], ["reds"]]
        upper, reds, count = lin.nodes
        # the first node's inputs are the dataset's records, slot by slot
        assert lin.dataset("src").records == src_records
        assert [lin.ops[k].inputs for k in upper.ops] == [[d] for d in src_records]
        assert all(lin.ops[k].upstream == [DATASET_PREFIX + "src"] for k in upper.ops)
        # each filter op reads the record its map op wrote; the group op reads every filter op
        for k in reds.ops:
            (up,) = lin.ops[k].upstream
            assert up in upper.ops and lin.ops[k].inputs == lin.ops[up].outputs
        (group_key,) = count.ops
        assert set(lin.ops[group_key].upstream) == set(reds.ops)
        assert lin.ops[group_key].inputs == [reds.output]
        assert walk_to_sources(lin, group_key) == {DATASET_PREFIX + "src"}
        assert len(lin.ops) == 24 + 24 + 1
        for op in lin.ops.values():
            assert op.state == "done"
            assert op.worker in fabric.worker_ids and op.device_class == "cpu"
            assert 0 < op.started_at <= op.ended_at and op.attempts >= 1
            # a small result is listed inline (no output manifest of its own)
            assert op.executor and op.version and (op.output or len(op.outputs) == op.n_outputs)
            assert [(r.workflow_id, r.role) for r in op.requests] == [(wf, "ran")]
        assert lin.ops[group_key].params == {"by": "colour", "agg": "count", "field": None}
        # asking for the first node leaves its descendants out
        assert [n.name for n in upper_only.nodes] == ["upper"]
        assert set(upper_only.ops) == set(upper.ops)

        # once the submission has aged out of the stream, the edges come from the digests
        async def aged_out(*args: Any) -> None:
            return None

        monkeypatch.setattr(lineage.reads, "submitted_spec", aged_out)
        # ...and the status predates node specs in it
        kv_wf = await fm.bus.kv(streams.KV_WF)
        current = await kv_wf.get(wf)
        old = codec.decode(current.value, WorkflowStatus)
        for ns in old.nodes.values():
            ns.spec = None
        await kv_wf.put(wf, codec.encode(old))
        inferred = await build_lineage(fm, wf, "count")
        monkeypatch.undo()
        await kv_wf.put(wf, current.value)
        assert all(n.inputs_inferred for n in inferred.nodes) and inferred.warnings
        assert [n.inputs for n in inferred.nodes] == [["src"], ["upper"], ["reds"]]
        assert {k: o.upstream for k, o in inferred.ops.items()} == {
            k: o.upstream for k, o in lin.ops.items()
        }

        # an invalidated cache entry: shown as such, its input recovered from its slot
        kv = await fm.bus.kv(streams.KV_OPS)
        gone = upper.ops[5]
        await kv.delete(gone)
        again = await build_lineage(fm, wf, "count")
        assert again.ops[gone].state == "invalidated"
        assert again.ops[gone].inputs == [src_records[5]]
        assert again.ops[gone].upstream == [DATASET_PREFIX + "src"]
        assert again.ops[gone].requests and again.ops[gone].requests[0].workflow_id == wf
        # a workflow that failed before its dataset manifest was recorded: the dataset's
        # records come from the submitted table
        kv_wf = await fm.bus.kv(streams.KV_WF)
        status = codec.decode((await kv_wf.get(wf)).value, WorkflowStatus)
        status.datasets = {}
        await kv_wf.put(wf, codec.encode(status))
        no_manifest = await build_lineage(fm, wf, "count")
        assert no_manifest.dataset("src").records == src_records
        assert no_manifest.ops[upper.ops[0]].upstream == [DATASET_PREFIX + "src"]
        console = Console(record=True, width=200)
        render(again, console, limit=3)
        text = console.export_text()
        assert "dataset src: 24 records" in text and "invalidated" in text
        assert "and 21 more ops" in text


async def test_lineage_pages_read_what_they_show_and_add_up_to_the_whole(
    make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    fabric = make_fabric(workers=2)
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(chain("pages", records(range(30))))
        await fm.wait(wf, timeout=60)
        whole = await build_lineage(fm, wf)
        # input nodes above 5 operators are linked by windows of slots, not read whole
        monkeypatch.setattr(lineage_pages, "LINK_ALL", 5)
        reads_done: list[str] = []
        op_state = lineage.reads.op_state

        async def counted(bus: Any, key: str) -> Any:
            reads_done.append(key)
            return await op_state(bus, key)

        monkeypatch.setattr(lineage.reads, "op_state", counted)
        page = await build_lineage_page(fm, wf, page=LineageCursor("reds", 10), limit=5)
        # one page reads its own 5 entries and a window of upper's, not the 61 operators
        assert len(reads_done) < 30
        assert page.paged and [n.name for n in page.nodes] == ["upper", "reds", "count"]
        reds = page.node("reds")
        assert reds.ops == whole.node("reds").ops[10:15] and reds.n_ops == 30
        assert page.node("upper").ops == [] and page.next_page == LineageCursor("reds", 15)
        for k in reds.ops:  # linked exactly as in the whole graph (map is one to one)
            assert page.ops[k].upstream == whole.ops[k].upstream
        # the group op reads all 30 filter ops: named by its node in a page
        (group,) = whole.node("count").ops
        last = await build_lineage_page(fm, wf, page=LineageCursor("count"))
        assert last.ops[group].upstream == [NODE_PREFIX + "reds"] and last.next_page is None

        # every page, fetched in turn, adds up to the graph built in one piece
        pages: list[Lineage] = []

        async def fetch(cursor: LineageCursor | None, limit: int) -> Lineage:
            pages.append(await build_lineage_page(fm, wf, page=cursor, limit=7))
            return pages[-1]

        merged = await collect_pages(fetch)
        assert len(pages) == 5 + 5 + 1  # 30 + 30 + 1 operators, 7 at a time
        assert [n.ops for n in merged.nodes] == [n.ops for n in whole.nodes]
        assert merged.ops.keys() == whole.ops.keys()
        for k, op in whole.ops.items():
            assert set(merged.ops[k].upstream) == set(op.upstream), op.node
        with pytest.raises(LineageError, match="no node 'nope'"):
            await build_lineage_page(fm, wf, page=LineageCursor("nope"))
        # a page that would not fit a reply is cut, and the next one starts after it
        ten = await build_lineage_page(fm, wf, page=LineageCursor("reds", 10), limit=10)
        budget = len(codec.encode(ten)) - 1
        cut = await build_lineage_page(
            fm, wf, page=LineageCursor("reds", 10), limit=10, max_bytes=budget
        )
        assert 1 <= len(cut.ops) < 10 and len(codec.encode(cut)) <= budget
        assert cut.node("reds").ops == ten.node("reds").ops[: len(cut.ops)]
        assert cut.next_page == LineageCursor("reds", 10 + len(cut.ops))


async def test_shared_results_name_every_workflow_and_tenant(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    async with await connect(fabric, 2) as fm:
        # global dedup scope: ids 10..19 are in both workflows
        wf_a = await fm.submit(chain("shared-a", records(range(0, 20)), tenant="acme"))
        await fm.wait(wf_a, timeout=60)
        wf_b = await fm.submit(chain("shared-b", records(range(10, 30)), tenant="globex"))
        await fm.wait(wf_b, timeout=60)
        lin = await build_lineage(fm, wf_b, "count")

    upper = lin.node("upper")
    assert len(upper.ops) == 20 and upper.reused == 10
    for slot, key in enumerate(upper.ops):
        op = lin.ops[key]
        who = {(r.workflow_id, r.tenant, r.role) for r in op.requests}
        if slot < 10:  # ids 10..19: run for acme, reused by globex
            assert who == {(wf_a, "acme", "ran"), (wf_b, "globex", "reused")}
            assert op.shared and op.created_by == wf_a
        else:
            assert who == {(wf_b, "globex", "ran")}
            assert not op.shared and op.created_by == wf_b
    # the filter ops of the shared records are shared too; the group sees other data
    reds = lin.node("reds")
    assert sum(lin.ops[k].shared for k in reds.ops) == 10
    (group_key,) = lin.node("count").ops
    assert [(r.workflow_id, r.tenant) for r in lin.ops[group_key].requests] == [(wf_b, "globex")]
    console = Console(record=True, width=220)
    render(lin, console)
    text = console.export_text()
    assert f"{wf_a}/acme ran" in text and f"{wf_b}*/globex reused" in text


def check_event(event: dict[str, Any]) -> None:
    for name in ("eventType", "eventTime", "run", "job", "inputs", "outputs"):
        assert name in event, name
    assert event["producer"] == PRODUCER and event["schemaURL"] == SCHEMA_URL
    assert event["eventType"] in ("START", "COMPLETE", "FAIL")
    assert event["eventTime"].endswith("Z")
    datetime.fromisoformat(event["eventTime"].replace("Z", "+00:00"))
    uuid.UUID(event["run"]["runId"])
    assert event["job"]["namespace"] == "flowmesh" and event["job"]["name"]
    for ds in event["inputs"] + event["outputs"]:
        assert ds["namespace"] == "flowmesh-cas" and len(ds["name"]) == 64
    for facet in event["run"].get("facets", {}).values():
        assert facet["_producer"] == PRODUCER and facet["_schemaURL"].startswith("https://")


async def test_openlineage_export(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(chain("ol", records(range(12)), tenant="acme"))
        await fm.wait(wf, timeout=60)
        lin1 = await build_lineage(fm, wf)
        lin2 = await build_lineage(fm, wf)
        # one record without a text field: its map operator fails, and the workflow
        bad_rows = [*records(range(3)), {"id": 99, "colour": "x"}]
        bad = await fm.submit(chain("ol-bad", bad_rows, tenant="acme"))
        await fm.wait(bad, timeout=60, raise_on_failure=False)
        failed = await build_lineage(fm, bad)
    events = json.loads(json.dumps(openlineage_events(lin1)))
    again = openlineage_events(lin2)
    assert isinstance(events, list) and events == json.loads(json.dumps(again))
    for event in events:
        check_event(event)

    wf_run = workflow_run_id(wf)
    op_events = [e for e in events if e["run"]["runId"] != wf_run]
    wf_events = [e for e in events if e["run"]["runId"] == wf_run]
    assert [e["eventType"] for e in wf_events] == ["START", "COMPLETE"]
    assert all(e["job"]["name"] == "ol" for e in wf_events)
    completes = [e for e in op_events if e["eventType"] == "COMPLETE"]
    starts = [e for e in op_events if e["eventType"] == "START"]
    done = [op for op in lin1.ops.values() if op.state == "done"]
    assert len(completes) == len(starts) == len(done) == 12 + 12 + 1
    assert {e["run"]["runId"] for e in completes} == {op_run_id(op.key) for op in done}
    for e in completes:
        parent = e["run"]["facets"]["parent"]
        assert parent["run"]["runId"] == wf_run
        assert parent["job"] == {"namespace": "flowmesh", "name": "ol"}
        fm_facet = e["run"]["facets"]["flowmesh"]
        op = lin1.ops[fm_facet["key"]]
        assert e["run"]["runId"] == op_run_id(op.key)
        assert e["job"]["name"] == f"ol.{op.node}"
        assert fm_facet["worker"] == op.worker and fm_facet["attempts"] >= 1
        assert fm_facet["requested_by"] == [
            {"workflow_id": wf, "tenant": "acme", "node": op.node, "role": "ran"}
        ]
        names = {d["name"] for d in e["outputs"]}
        assert set(op.outputs) <= names and (op.output is None or op.output in names)
        assert [d["name"] for d in e["inputs"]] == list(dict.fromkeys(op.inputs))

    # a failed workflow: the failed operator is in its lineage, with a FAIL event
    assert failed.state == "failed" and failed.partial
    assert not failed.node("upper").complete
    bad_ops = [o for o in failed.ops.values() if o.state == "failed"]
    assert len(bad_ops) == 1 and "text" in (bad_ops[0].error or "")
    assert bad_ops[0].upstream == [DATASET_PREFIX + "src"]
    bad_events = openlineage_events(failed)
    for event in bad_events:
        check_event(event)
    fails = [e for e in bad_events if e["eventType"] == "FAIL"]
    assert [e["run"]["runId"] for e in fails] == [
        op_run_id(bad_ops[0].key),
        workflow_run_id(failed.workflow_id),
    ]
    assert "errorMessage" in fails[0]["run"]["facets"]


async def test_running_workflow_shows_complete_nodes_only(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=1)
    spec = parse_spec(
        {
            "name": "running",
            "datasets": {"src": {"records": records(range(6))}},
            "nodes": [
                {
                    "name": "upper",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "src",
                    "params": {"field": "text"},
                },
                {
                    "name": "slow",
                    "op": "map",
                    "fn": "test.slow_upper",
                    "input": "upper",
                    "params": {"field": "colour", "delay": 0.5},
                },
            ],
        }
    )
    async with await connect(fabric, 1) as fm:
        wf = await fm.submit(spec)
        for _ in range(200):
            st = await fm.status(wf)
            if st and st.nodes["upper"].complete:
                break
            await asyncio.sleep(0.05)
        lin = await build_lineage(fm, wf)
    assert lin.state == "running" and lin.partial
    upper, slow = lin.nodes
    assert upper.complete and len(upper.ops) == 6
    assert not slow.complete and slow.ops == [] and "not complete" in (slow.note or "")
    console = Console(record=True, width=200)
    render(lin, console)
    assert "partial: the workflow is still running" in console.export_text()
    # a running workflow has no COMPLETE event of its own yet
    events = openlineage_events(lin)
    assert [e["eventType"] for e in events if e["run"]["runId"] == workflow_run_id(wf)] == ["START"]


def test_cli_lineage(make_fabric: MakeFabric, tmp_path: Path) -> None:
    fabric = make_fabric(workers=1)

    async def run() -> str:
        fm: FlowMesh
        async with await connect(fabric, 1) as fm:
            wf = await fm.submit(chain("cli", records(range(8)), tenant="acme"))
            await fm.wait(wf, timeout=60)
            return wf

    wf = asyncio.run(run())
    env = dict(os.environ, FLOWMESH_NATS=fabric.nats_url, FLOWMESH_CAS=fabric.cas_url)

    def flowmesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowmesh.engine.cli", "lineage", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
        )

    ol_file = tmp_path / "events.json"
    out = flowmesh(wf, "reds", "--openlineage", str(ol_file))
    assert out.returncode == 0, out.stderr
    assert "dataset src: 8 records" in out.stdout
    assert "reds ←" in out.stdout and "upper ←" in out.stdout and "count ←" not in out.stdout
    assert "acme" in out.stdout
    events = json.loads(ol_file.read_text())
    assert sum(e["eventType"] == "COMPLETE" for e in events) == 8 + 8 + 1  # + the workflow
    graph = json.loads(flowmesh(wf, "--json").stdout)
    assert [n["name"] for n in graph["nodes"]] == ["upper", "reds", "count"]
    assert len(graph["ops"]) == 17
    missing = flowmesh(wf, "nope")
    assert missing.returncode == 1 and "no node 'nope'" in missing.stderr
