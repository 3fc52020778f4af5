"""Every operator is held to a wall-time limit and an output-size limit, whichever
executor runs it (issue 17, item 2), and a failure that would only repeat (a limit, bad
params) fails the operator at once instead of being retried."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from flowmesh.engine.spec import SpecError, parse_spec
from flowmesh.workers import runtime
from flowmesh.workers.executors.base import OpError, OpInput, OpTimeout, Outcome, Record
from flowmesh.workers.executors.transform import MapExecutor
from flowmesh.workers.runtime import Worker, WorkerConfig
from tests.conftest import PLUGINS, MakeFabric, connect
from tests.workflows import map_then_count


@pytest.fixture(autouse=True)
def test_fns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """tests/plugins' transforms registered for this module's tests only (other tests
    list the built-in ones)."""
    from flowmesh.workers.executors import transform

    before = dict(transform._REGISTRY)
    monkeypatch.syspath_prepend(str(PLUGINS))
    module = sys.modules.get("fm_test_transforms")
    if module is None:
        importlib.import_module("fm_test_transforms")
    else:
        importlib.reload(module)  # the same origins again: allowed
    yield
    transform._REGISTRY.clear()
    transform._REGISTRY.update(before)


def ops(fn_params: list[dict[str, Any]]) -> list[OpInput]:
    return [
        OpInput(key=f"{i:064x}", params=p, inputs=[[{"text": f"r{i}"}]])
        for i, p in enumerate(fn_params)
    ]


def bare_worker() -> Worker:
    """A worker's executor side only: _run_watched needs no bus or CAS."""
    return Worker(cast(Any, None), cast(Any, None), WorkerConfig(worker_id="w-limits"))


async def ticking(stop: asyncio.Event) -> float:
    """The longest gap between ticks of this event loop while `stop` is unset: how long
    heartbeats would have waited."""
    gap, last = 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.05)
        now = time.monotonic()
        gap, last = max(gap, now - last), now
    return gap


async def test_a_slow_transform_is_stopped_at_its_wall_time_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "OP_WALL_S", 0.5)
    worker = bare_worker()
    batch = ops([{"seconds": 0.05}, {"seconds": 600}, {"seconds": 0.05}])
    stop = asyncio.Event()
    ticks = asyncio.create_task(ticking(stop))
    t0 = time.monotonic()
    outcomes = await worker._run_watched(MapExecutor("test.spin"), batch, None)
    took = time.monotonic() - t0
    stop.set()
    assert await ticks < 0.4  # the loop (heartbeats, acks) kept running meanwhile
    assert took < 3, took
    first, slow, last = outcomes
    assert isinstance(first, list) and isinstance(last, list)  # its batch-mates ran
    assert isinstance(slow, OpError) and slow.permanent
    assert "ran past the 0.5 s wall-time limit of one operator" in str(slow)
    assert worker.abandoned == 0


async def test_code_blocked_in_c_is_abandoned_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """time.sleep does not see the interrupt until it returns: the worker stops waiting,
    fails the operators and goes on."""
    monkeypatch.setattr(runtime, "OP_WALL_S", 0.3)
    monkeypatch.setattr(runtime, "ABANDON_AFTER_S", 0.5)
    worker = bare_worker()
    t0 = time.monotonic()
    batch = ops([{"field": "text", "delay": 30}, {"field": "text", "delay": 0}])
    outcomes = await worker._run_watched(MapExecutor("test.slow_upper"), batch, None)
    assert time.monotonic() - t0 < 15  # not the 30 s sleep (a bound loose for a busy box)
    assert all(isinstance(o, OpError) and o.permanent for o in outcomes)
    assert "wall-time limit" in str(outcomes[0])
    assert worker.abandoned == 1
    assert worker.restart_reason == ""  # no model: the worker goes on

    # one that holds a model could still be using it: the worker will exit and restart
    outcomes = await worker._run_watched(MapExecutor("test.slow_upper"), batch[:1], object())
    assert isinstance(outcomes[0], OpError)
    assert "model" in worker.restart_reason


class _WholeBatch:
    """An executor that runs its batch as one (as generate, embed, score and train do),
    in a Python loop that never ends on its own."""

    id = "test/whole-batch"
    kind = "generate"
    version = "1"
    max_batch = 8

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        while True:
            sum(range(1000))


async def test_a_batch_run_as_one_is_stopped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "OP_WALL_S", 0.3)
    worker = bare_worker()
    t0 = time.monotonic()
    with pytest.raises(OpTimeout):  # _run_and_commit fails each op with the limit
        await worker._run_watched(_WholeBatch(), ops([{}, {}]), None)
    assert time.monotonic() - t0 < 15  # the loop never ends by itself


def test_outputs_over_the_limit_fail_for_every_executor() -> None:
    huge: list[Record] = [{"i": i} for i in range(10_001)]
    bounded = runtime._bounded("k" * 64, huge)
    assert isinstance(bounded, OpError) and bounded.permanent
    assert "at most 10000" in str(bounded)
    ok: list[Record] = [{"i": 1}]
    assert runtime._bounded("k" * 64, ok) == ok


async def test_limits_fail_at_once_and_the_worker_stays_responsive(
    make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real worker processes: a tenant's transform that spins past the limit fails with
    the limit in its error after one attempt, the worker heartbeats throughout, and
    another tenant's workflow completes. A template past its width limit fails at once
    (it was retried 3 times); an ordinary failure is still retried."""
    monkeypatch.setenv("FLOWMESH_OP_WALL_S", "2")
    fabric = make_fabric(workers=1)
    async with await connect(fabric, 1) as fm:
        spin = await fm.submit(
            map_then_count("spin", [{"text": "x", "colour": "red"}], "test.spin", count=None,
                           tenant="a", seconds=600)
        )  # fmt: skip
        victim = await fm.submit(
            map_then_count("victim", [{"text": f"v{i}", "colour": "red"} for i in range(4)],
                           "test.slow_upper", tenant="b", delay=0.01)
        )  # fmt: skip
        beats: list[float] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:
            beats.extend(w.sent_at for w in await fm.workers())
            await asyncio.sleep(0.2)
        distinct = sorted(set(beats))
        gaps = [b - a for a, b in itertools.pairwise(distinct)]
        # heartbeats every 1 s while the spin ran (a frozen worker sends none; the
        # bound leaves room for a busy box)
        assert len(distinct) >= 2 and max(gaps) < 3.5, distinct

        status = await fm.wait(spin, timeout=60, raise_on_failure=False)
        assert status.state == "failed"
        assert "wall-time limit" in (status.error or ""), status.error
        assert status.failure is not None and status.failure.attempts == 1
        done = await fm.wait(victim, timeout=60)
        assert done.state == "completed"
        # the attack table's figure (pytest -s shows it): one worker, so the victim
        # waits for the spin's batch to reach its limit, and no longer
        took = (done.ended_at or 0) - done.submitted_at
        print(f"victim completed in {took:.2f}s during a spin (wall-time limit 2 s)")

        wide = await fm.submit(
            parse_spec(
                {
                    "name": "wide",
                    "tenant": "a",
                    "datasets": {"src": {"records": [{"text": "x"}]}},
                    "nodes": [
                        {"name": "t", "op": "map", "fn": "text.template", "input": "src",
                         "params": {"template": "{text:>100000000}", "output_field": "out"}},
                    ],
                }
            )
        )  # fmt: skip
        status = await fm.wait(wide, timeout=60, raise_on_failure=False)
        assert status.state == "failed" and "limited to 10000" in (status.error or "")
        assert status.failure is not None and status.failure.attempts == 1

        # the workers' typed signatures reach validation (read at once since this issue)
        with pytest.raises(SpecError, match=r"test\.slow_upper parameter 'delay' is float"):
            await fm.submit(
                map_then_count("typed", [{"text": "x", "colour": "red"}], "test.slow_upper",
                               count=None, delay="slow")
            )  # fmt: skip

        poison = await fm.submit(
            map_then_count("poison", [{"text": "bad", "colour": "red"}], "test.fail_on",
                           count=None, tenant="a", bad="bad")
        )  # fmt: skip
        status = await fm.wait(poison, timeout=60, raise_on_failure=False)
        assert status.state == "failed"
        assert status.failure is not None and status.failure.attempts == 3
