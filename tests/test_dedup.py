"""De-duplication across workflows and tenants, and who pays for shared work.

Executions are counted at the executor: the `test.count_upper` transform appends a line
to $FM_COUNT_FILE in the worker process every time it really runs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.cost import cost_report, kv_values
from flowmesh.engine.lineage.reads import all_requests
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import codec, streams
from flowmesh.topics.messages import RAN_PREFIX, OpState, WorkflowSpec
from tests.conftest import REPO, MakeFabric, connect

pytestmark = pytest.mark.slow


def rows(ids: range) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"record {i}", "colour": "red" if i % 3 else "blue"} for i in ids]


def workflow(records: list[dict[str, Any]], tenant: str, scope: str = "global") -> WorkflowSpec:
    return parse_spec(
        {
            "name": f"shout-{tenant}",
            "tenant": tenant,
            "dedup_scope": scope,
            "datasets": {"src": {"records": records}},
            "nodes": [
                {
                    "name": "shout",
                    "op": "map",
                    "fn": "test.count_upper",
                    "input": "src",
                    "params": {"field": "text"},
                },
                {
                    "name": "per_colour",
                    "op": "group",
                    "input": "shout",
                    "params": {"by": "colour", "agg": "count"},
                },
            ],
        }
    )


def executions(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in path.read_text().splitlines())


async def expect_results(fm: FlowMesh, wf: str, records: list[dict[str, Any]]) -> None:
    assert await fm.result(wf, "shout") == [{**r, "text": r["text"].upper()} for r in records]
    colours = Counter(r["colour"] for r in records)
    assert await fm.result(wf, "per_colour") == [
        {"colour": c, "count": n} for c, n in sorted(colours.items())
    ]


async def test_overlapping_tenants_run_each_unique_operator_once(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "executions.txt"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))
    fabric = make_fabric(workers=2, worker_args=("--price-per-hour", "3.6", "--watts", "300"))
    a, b = rows(range(0, 20)), rows(range(10, 30))  # records 10..19 are shared
    async with await connect(fabric, 2) as fm:
        # acme and globex submit the very same workflow at the same moment; initech
        # overlaps on half the records
        specs = [workflow(a, "acme"), workflow(a, "globex"), workflow(b, "initech")]
        wfs = await asyncio.gather(*(fm.submit(s) for s in specs))
        for wf in wfs:
            assert (await fm.wait(wf, timeout=120)).state == "completed"
        for wf, recs in zip(wfs, [a, a, b], strict=True):
            await expect_results(fm, wf, recs)

        # 30 distinct records: 30 executions, each exactly once
        ran = executions(count_file)
        assert sorted(ran) == list(range(30)) and set(ran.values()) == {1}, ran

        states = [
            codec.decode(v, OpState) for v in (await kv_values(fm.bus, streams.KV_OPS)).values()
        ]
        requests = await all_requests(fm.bus)
        # 30 map operators + 2 group operators (acme and globex share theirs)
        assert len(states) == 32 and all(s.state == "done" for s in states)
        askers: dict[str, set[str]] = {}
        for r in requests:
            askers.setdefault(r.key, set()).add(r.tenant)
        shout_of = {s.spec.inputs[0]: s for s in states if s.spec.kind == "map"}
        for rec in a + b:
            op = shout_of[codec.digest_of(rec)]
            rid = rec["id"]
            expected = {"initech"} if rid >= 20 else {"acme", "globex"}
            if 10 <= rid < 20:
                expected.add("initech")
            assert askers[op.key] == expected, (rid, askers[op.key])
        # each request names exactly one role; one workflow started each operator
        roles = Counter(r.role for r in requests)
        assert roles["ran"] == 32
        assert roles["joined"] + roles["reused"] == len(requests) - 32
        # stored: the ran ones one entry per wave, the joined and reused one per key
        names = [name for name, _, _ in await fm.bus.kv_items(streams.KV_REQUESTS)]
        per_wave = sum(name.startswith(RAN_PREFIX) for name in names)
        assert 0 < per_wave < 32 and len(names) - per_wave == len(requests) - 32

        # status counts, per workflow and node, the operators another workflow started
        statuses = [await fm.status(wf) for wf in wfs]
        shared_seen = sum(n.reused for st in statuses if st for n in st.nodes.values())
        assert shared_seen == roles["joined"] + roles["reused"]

        report = await cost_report(fm.bus)
        total = sum(s.cost_usd for s in states)
        assert total > 0
        assert report.total_usd == pytest.approx(total)
        paid = sum(bill.paid_usd for bill in report.workflows.values())
        assert paid == pytest.approx(total, rel=1e-9)  # the split adds up to what was spent
        assert sum(t.paid_usd for t in report.tenants.values()) == pytest.approx(total)
        energy = sum(bill.paid_energy_j for bill in report.workflows.values())
        assert energy == pytest.approx(sum(s.energy_j for s in states))
        bills = {report.workflows[wf].tenant: report.workflows[wf] for wf in wfs}
        # identical workflows pay identical shares; everyone saved something
        assert bills["acme"].paid_usd == pytest.approx(bills["globex"].paid_usd)
        assert all(bill.saved_usd > 0 for bill in bills.values())
        for bill in bills.values():
            assert bill.alone_usd == pytest.approx(bill.paid_usd + bill.saved_usd)

        # and the CLI reports the same split
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowmesh.engine.cli",
                "cost",
                "--json",
                "--nats",
                fabric.nats_url,
                "--tenant",
                "initech",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert list(out["tenants"]) == ["initech"]
        assert out["tenants"]["initech"]["paid_usd"] == pytest.approx(bills["initech"].paid_usd)


async def test_completed_work_is_reused_not_rerun(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "executions.txt"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))
    fabric = make_fabric(workers=1)
    recs = rows(range(12))
    async with await connect(fabric, 1) as fm:
        first = await fm.submit(workflow(recs, "acme"))
        await fm.wait(first, timeout=60)
        assert sum(executions(count_file).values()) == 12
        second = await fm.submit(workflow(recs, "globex"))
        status = await fm.wait(second, timeout=60)
        await expect_results(fm, second, recs)
    assert sum(executions(count_file).values()) == 12  # nothing ran again
    assert status.nodes["shout"].reused == 12 and status.nodes["per_colour"].reused == 1


async def test_tenant_scope_prevents_reuse(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "executions.txt"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))
    fabric = make_fabric(workers=1)
    recs = rows(range(8))
    async with await connect(fabric, 1) as fm:
        shared = await fm.submit(workflow(recs, "acme"))
        await fm.wait(shared, timeout=60)
        private = await fm.submit(workflow(recs, "globex", scope="tenant"))
        status = await fm.wait(private, timeout=60)
        await expect_results(fm, private, recs)
        requests = await all_requests(fm.bus)
    # globex opted out: it ran everything itself and met none of acme's keys
    assert executions(count_file) == Counter({i: 2 for i in range(8)})
    assert status.nodes["shout"].reused == 0 and status.nodes["per_colour"].reused == 0
    keys_of = {wf: {r.key for r in requests if r.workflow_id == wf} for wf in (shared, private)}
    assert keys_of[shared] and keys_of[private] and not keys_of[shared] & keys_of[private]
    assert all(r.role == "ran" for r in requests)
