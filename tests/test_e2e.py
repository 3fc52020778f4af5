"""End to end on a real nats-server with real engine and worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.messages import OpState, WorkflowSpec
from tests.conftest import MakeFabric, connect
from tests.workflows import map_then_count

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"

pytestmark = pytest.mark.slow


async def op_states(fm: FlowMesh) -> list[OpState]:
    """Every operator's stored state. Read with Bus.kv_items, not nats-py's kv.keys():
    its listing can end before entries the server already sent (nats-io/nats.py#842), and
    a full bucket then raised NoKeysError in a CI run."""
    entries = await fm.bus.kv_items(streams.KV_OPS)
    return [codec.decode(value, OpState) for _key, value, _rev in entries]


def records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "text": f"item {i} is {'red' if i % 3 else 'blue'}",
            "colour": "red" if i % 3 else "blue",
        }
        for i in range(n)
    ]


def slow_spec(name: str, rows: list[dict[str, Any]], delay: float, count: bool) -> WorkflowSpec:
    """Upper-case each record slowly (so a batch is still running when a test kills
    something), and optionally count per colour after."""
    return map_then_count(
        name, rows, "test.slow_upper", node="slow", count="count" if count else None, delay=delay
    )


async def test_three_node_workflow_matches_python(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    rows = records(30)
    spec = parse_spec(
        {
            "name": "three",
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
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(spec)
        status = await fm.wait(wf, timeout=120)
        upper = await fm.result(wf, "upper")
        reds = await fm.result(wf, "reds")
        count = await fm.result(wf, "count")

    expected_upper = [{**r, "text": r["text"].upper()} for r in rows]
    expected_reds = [r for r in expected_upper if "RED" in r["text"]]
    assert upper == expected_upper  # in input order, whatever order the ops ran in
    assert reds == expected_reds
    colours = Counter(r["colour"] for r in expected_reds)
    assert count == [{"colour": c, "count": n} for c, n in sorted(colours.items())]
    assert status.state == "completed"
    assert status.nodes["upper"].total == 30 and status.nodes["reds"].total == 30
    assert status.nodes["count"].total == 1


async def test_two_workers_share_the_load(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    rows = records(40)
    spec = slow_spec("share", rows, delay=0.05, count=False)
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(spec)
        await fm.wait(wf, timeout=120)
        assert await fm.result(wf, "slow") == [{**r, "text": r["text"].upper()} for r in rows]
        by_worker = Counter(s.worker for s in await op_states(fm))
    assert set(by_worker) == set(fabric.worker_ids), by_worker
    assert sum(by_worker.values()) == 40


async def test_worker_killed_mid_batch_workflow_completes(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    rows = records(40)
    spec = slow_spec("kill", rows, delay=0.3, count=True)
    victim_id = fabric.worker_ids[0]
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(spec)
        # wait until the victim holds a batch, then let it get into it
        for _ in range(300):
            info = await fm.bus.js.stream_info(
                streams.STREAM_ASSIGN, subjects_filter=subjects.ASSIGN_ALL
            )
            if (info.state.subjects or {}).get(subjects.assign(victim_id)):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the victim never got a batch")
        # each op takes 0.3 s, so 0.1 s after the batch lands the victim is inside it
        await asyncio.sleep(0.1)
        os.kill(fabric.worker_procs[0].pid, signal.SIGKILL)
        fabric.worker_procs[0].wait()
        status = await fm.wait(wf, timeout=120)
        slow = await fm.result(wf, "slow")
        count = await fm.result(wf, "count")
        states = await op_states(fm)

    assert status.state == "completed"
    assert slow == [{**r, "text": r["text"].upper()} for r in rows]
    assert count == [{"colour": "blue", "count": 14}, {"colour": "red", "count": 26}]
    assert all(s.state == "done" for s in states) and len(states) == 41
    engine_log = (fabric.log_dir or Path()).joinpath("engine.log").read_text()
    reclaims = [
        json.loads(line) for line in engine_log.splitlines() if '"worker reclaimed"' in line
    ]
    assert any(r["worker"] == victim_id and r["ops"] > 0 for r in reclaims), reclaims


async def test_submission_is_idempotent_and_garbage_is_dead_lettered(
    make_fabric: MakeFabric,
) -> None:
    fabric = make_fabric(workers=1)
    spec = parse_spec(
        {
            "name": "idem",
            "datasets": {"src": {"records": records(5)}},
            "nodes": [
                {
                    "name": "up",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "src",
                    "params": {"field": "text"},
                }
            ],
        }
    )
    async with await connect(fabric, 1) as fm:
        await fm.bus.nc.publish(subjects.SUBMIT, b"\xff not a submission")
        await fm.bus.js.publish(subjects.SUBMIT, b'{"workflow_id": "x"}')
        wf1 = await fm.submit(spec, "wf-same-id")
        wf2 = await fm.submit(spec, "wf-same-id")
        assert wf1 == wf2
        await fm.wait(wf1, timeout=60)
        ids = [s.workflow_id for s in await fm.workflows()]
        assert ids.count("wf-same-id") == 1
        dlq = await fm.bus.js.stream_info(streams.STREAM_DLQ)
        assert dlq.state.messages >= 1
        sub = await fm.bus.js.pull_subscribe(subjects.DLQ_ALL, stream=streams.STREAM_DLQ)
        letters = [json.loads(m.data) for m in await sub.fetch(10, timeout=2)]
        assert any("SubmitWorkflow" in ltr["reason"] for ltr in letters), letters
        # and the planner is still serving
        wf3 = await fm.submit(spec)
        assert (await fm.wait(wf3, timeout=60)).state == "completed"
    assert fabric.alive()["engine"]


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    """The README's demo command, as a newcomer runs it (private nats; the tiny Llama
    rather than the default SmolLM2, whose first run converts it for a minute)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmesh.engine.cli",
            "demo",
            "--model",
            "tiny-llama",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    answers = [r for r in rows if "answer" in r]
    per_topic = [r for r in rows if "count" in r]
    assert answers and all(isinstance(r["answer"], str) for r in answers)
    questions = [
        json.loads(line)["question"]
        for line in (REPO / "configs" / "data" / "questions.jsonl").read_text().splitlines()
    ]
    assert sum(r["count"] for r in per_topic) == sum(len(q.split()) >= 3 for q in questions)


async def test_engine_killed_mid_run_restarts_and_completes(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=2)
    rows = records(40)
    spec = slow_spec("engine-kill", rows, delay=0.1, count=True)
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(spec)
        for _ in range(300):
            st = await fm.status(wf)
            if st and st.nodes["slow"].done > 0:
                break
            await asyncio.sleep(0.05)
        assert fabric.engine_proc is not None
        os.kill(fabric.engine_proc.pid, signal.SIGKILL)
        fabric.engine_proc.wait()
        await asyncio.sleep(0.5)
        fabric.start_engine()
        status = await fm.wait(wf, timeout=120)
        assert await fm.result(wf, "slow") == [{**r, "text": r["text"].upper()} for r in rows]
        assert await fm.result(wf, "count") == [
            {"colour": "blue", "count": 14},
            {"colour": "red", "count": 26},
        ]
    assert status.state == "completed"


def test_cli_submit_status_result(make_fabric: MakeFabric, tmp_path: Path) -> None:
    """The verbs a user types, against a running fabric."""
    fabric = make_fabric(workers=1)
    data = tmp_path / "words.csv"
    data.write_text("id,text\n1,alpha beta\n2,gamma\n3,delta epsilon zeta\n")
    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(
        "name: cli\ntenant: acme\ndatasets:\n  words: {path: words.csv}\n"
        "nodes:\n  - {name: toks, op: tokenize, input: words, params: {field: text}}\n"
    )
    env = dict(os.environ, FLOWMESH_NATS=fabric.nats_url, FLOWMESH_CAS=fabric.cas_url)

    def flowmesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowmesh.engine.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=REPO,
        )

    sub = flowmesh("submit", str(wf_file), "--timeout", "90")
    assert sub.returncode == 0, sub.stderr
    wf = sub.stdout.strip()
    st = flowmesh("status", wf, "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["state"] == "completed" and status["tenant"] == "acme"
    res = flowmesh("result", wf, "toks")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["tokens"] for r in rows] == [
        ["alpha", "beta"],
        ["gamma"],
        ["delta", "epsilon", "zeta"],
    ]
    bad = flowmesh("result", wf, "nope")
    assert bad.returncode == 1 and "no node 'nope'" in bad.stderr
    wf_file.write_text("name: bad\nnodes:\n  - {name: a, op: teleport, input: x}\n")
    rejected = flowmesh("submit", str(wf_file))
    assert rejected.returncode == 2 and "unknown operator 'teleport'" in rejected.stderr
