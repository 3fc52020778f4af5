"""Fair bills: warm-up and waiting for a core are the fleet's overhead, reported as
such, not charged to whichever tenant's batch ran first; identical work gets the same
bill. On a real fabric with the tiny random Llama."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowmesh.engine.cost import cost_report, kv_values
from flowmesh.engine.spec import SpecError, parse_spec
from flowmesh.topics import codec, streams
from flowmesh.topics.messages import OpState
from flowmesh.workers import billing
from tests.conftest import MakeFabric, connect


def test_a_batch_is_billed_its_cpu_time_and_the_rest_is_overhead() -> None:
    # waiting for a core: 1.0 s of wall, 0.4 s of CPU
    assert billing.split(1.0, 0.4, 0.0, by_cpu=True) == pytest.approx((0.4, 0.6))
    # parallel threads: more CPU than wall is billed as the wall time
    assert billing.split(1.0, 3.0, 0.0, by_cpu=True) == pytest.approx((1.0, 0.0))
    # a GPU worker bills its wall time; a warm-up is overhead either way
    assert billing.split(1.0, 0.1, 2.5, by_cpu=False) == pytest.approx((1.0, 2.5))


def test_operators_are_billed_the_standard_rate_from_before_their_batch() -> None:
    rates = billing.StandardRates(alpha=0.5)
    key = ("generate", "m", "")
    assert rates.bill(key, 4, 2.0) == pytest.approx(0.5)  # the first sets the rate
    assert rates.bill(key, 4, 4.0) == pytest.approx(0.5)  # a slow batch pays the rate
    assert rates.bill(key, 2, 0.5) == pytest.approx(0.75)  # which the slow one moved
    assert rates.bill(("embed", "m", ""), 1, 0.1) == pytest.approx(0.1)  # per executor


def answers(name: str) -> Any:
    rows = [{"prompt": f"question number {i} about the sea"} for i in range(12)]
    return parse_spec(
        {
            "name": name,
            "dedup_scope": "workflow",  # the same work, run once per workflow
            "datasets": {"qs": {"records": rows}},
            "nodes": [
                {"name": "answers", "op": "generate", "model": "tiny-llama", "input": "qs",
                 "params": {"max_new_tokens": 32}},
            ],
        }
    )  # fmt: skip


@pytest.mark.slow
async def test_identical_work_gets_the_same_bill_and_warm_up_is_overhead(
    make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one compute thread, as loadgen run's workers: OpenMP threads spin while they wait
    # for each other, which bills a busy machine's contention as CPU time
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    fabric = make_fabric(workers=1, models=True)
    async with await connect(fabric, 1) as fm:
        # the first runs on a cold worker: its first generate batch is the warm-up
        for _ in range(300):  # the worker announces its models once it has them
            try:
                first = await fm.submit(answers("first"))
                break
            except SpecError as exc:
                assert "unknown model" in str(exc)
                await asyncio.sleep(0.2)
        assert (await fm.wait(first, timeout=300)).state == "completed"
        second = await fm.submit(answers("second"))
        assert (await fm.wait(second, timeout=300)).state == "completed"
        assert await fm.result(first, "answers") == await fm.result(second, "answers")
        report = await cost_report(fm.bus)
        states = [
            codec.decode(v, OpState) for v in (await kv_values(fm.bus, streams.KV_OPS)).values()
        ]
        runs = sorted(
            (s.workflow_id == second, s.batch_size, round(s.device_seconds, 4),
             round(s.overhead_seconds, 4), round(s.started_at, 2))
            for s in states
        )  # fmt: skip
    a = report.workflows[first].device_seconds
    b = report.workflows[second].device_seconds
    assert a > 0 and b > 0
    assert abs(a - b) <= 0.10 * max(a, b), (a, b, report.overhead_device_seconds, runs)
    # the warm-up is there, reported as the fleet's overhead, not in either bill
    assert report.overhead_device_seconds > 0
    assert report.overhead_usd > 0 and report.overhead_energy_j > 0
