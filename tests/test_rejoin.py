"""A worker that loses its assignment consumer gets it back, and the scheduler's take-back
never needs a consumer that could collide with the worker's (issue 13 items 2-3).

The reclaim race is driven by hand against a real nats-server: the worker's consumer is
deleted as the scheduler's reclaim deletes it, and a consumer filtered on the worker's
subject (what the old take-back created) blocks its first re-creates.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from flowmesh.engine.scheduler.live import Scheduler
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.messages import Assignment, OpSpec, OpState, ReadyChunk, ReadyOp
from tests.conftest import MakeFabric, connect
from tests.workflows import map_then_count


def _op(i: int) -> ReadyOp:
    spec = OpSpec(
        kind="map",
        executor="map.test",
        version="v1",
        fanout="record",
        params={},
        model=None,
        inputs=[f"d{i}"],
    )
    return ReadyOp(key=f"k{i}", spec=spec, batch_key="b", workflow_id="wf", tenant="t")


async def test_take_back_succeeds_when_the_worker_recreates_its_consumer_mid_reclaim(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine/scheduler/live.py used to create its own consumer on fm.assign.<wid>
    right after deleting the worker's; a worker that rejoined in between made that
    fail with err 10100 'filtered consumer not unique on workqueue stream', and the
    reclaimed operators were never republished."""
    bus = await Bus.connect(nats_url, "test-take-back", layout=streams.Layout())
    try:
        wid = "cpu-racer"
        await bus.js.add_consumer(streams.STREAM_ASSIGN, streams.worker_consumer(wid, 2))
        batches = [
            Assignment.of(uuid.uuid4().hex, wid, [_op(0), _op(1)], 0),
            Assignment.of(uuid.uuid4().hex, wid, [_op(2)], 0),
        ]
        for b in batches:
            await bus.publish(subjects.assign(wid), b, msg_id=b.batch_id)
        # another worker's assignment stays where it is
        other = Assignment.of("other", "cpu-other", [_op(9)], 0)
        await bus.publish(subjects.assign("cpu-other"), other, msg_id="other")

        real_delete = bus.js.delete_consumer

        async def delete_then_the_worker_rejoins(stream: str, name: str) -> bool:
            deleted = await real_delete(stream, name)
            if name == streams.worker_consumer_name(wid):
                # the worker's rejoin wins the race, as after a false death
                await bus.js.add_consumer(streams.STREAM_ASSIGN, streams.worker_consumer(wid, 2))
            return deleted

        monkeypatch.setattr(bus.js, "delete_consumer", delete_then_the_worker_rejoins)
        scheduler = Scheduler(bus)
        scheduler.kv_workers = await bus.kv(streams.KV_WORKERS)
        await asyncio.wait_for(scheduler._reclaim(wid, reason="heartbeat lost"), 30)

        assert scheduler.reclaimed_ops == 3
        ready = await bus.js.pull_subscribe(subjects.READY_ALL, stream=streams.STREAM_READY)
        msgs = await ready.fetch(10, timeout=2.0)
        ops = [op for m in msgs for op in codec.decode(m.data, ReadyChunk).ops]
        assert sorted(op.key for op in ops) == ["k0", "k1", "k2"]
        # a reclaim of a worker that was running something counts a loss on every op
        assert all(op.attempt == 1 for op in ops)
        info = await bus.js.stream_info(streams.STREAM_ASSIGN, subjects_filter=subjects.ASSIGN_ALL)
        assert (info.state.subjects or {}) == {subjects.assign("cpu-other"): 1}
        # the rejoined worker's consumer is intact: the scheduler leaves no consumer of
        # its own behind that would block the next re-create
        names = [c.name async for c in _consumers(bus)]
        assert names == [streams.worker_consumer_name(wid)]
    finally:
        await bus.close()


async def test_take_back_goes_on_when_the_rejoined_worker_acked_a_batch_meanwhile(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read back, then gone before the scheduler deletes it (the rejoined worker ran and
    acked it: work-queue retention removed it): JetStream answers err 10057 'no message
    found', which must not abort the reclaim (it did in `loadgen large`)."""
    bus = await Bus.connect(nats_url, "test-take-back-acked", layout=streams.Layout())
    try:
        wid = "cpu-quick"
        batches = [Assignment.of(f"b{i}", wid, [_op(i)], 0) for i in range(3)]
        for b in batches:
            await bus.publish(subjects.assign(wid), b, msg_id=b.batch_id)
        real_get = bus.js.get_msg

        async def get_then_the_worker_acks(*args: Any, **kwargs: Any) -> Any:
            raw = await real_get(*args, **kwargs)
            await bus.js.delete_msg(streams.STREAM_ASSIGN, raw.seq)  # its ack, in effect
            return raw

        monkeypatch.setattr(bus.js, "get_msg", get_then_the_worker_acks)
        scheduler = Scheduler(bus)
        assert await asyncio.wait_for(scheduler._take_back(wid, "b1"), 30) == 3
        ready = await bus.js.pull_subscribe(subjects.READY_ALL, stream=streams.STREAM_READY)
        ops = [
            op
            for m in await ready.fetch(10, timeout=2.0)
            for op in codec.decode(m.data, ReadyChunk).ops
        ]
        # only the batch that was running counts a loss
        assert sorted((op.key, op.attempt) for op in ops) == [("k0", 0), ("k1", 1), ("k2", 0)]
    finally:
        await bus.close()


async def _consumers(bus: Bus) -> Any:
    for c in await bus.js.consumers_info(streams.STREAM_ASSIGN):
        yield c


async def test_take_back_of_a_worker_with_nothing_is_zero(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test-take-back-empty", layout=streams.Layout())
    try:
        scheduler = Scheduler(bus)
        assert await asyncio.wait_for(scheduler._take_back("cpu-gone", None), 30) == 0
    finally:
        await bus.close()


def _log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if f'"{event}"' in ln]


async def _wait_for_log(path: Path, event: str, timeout: float) -> None:
    for _ in range(int(timeout * 10)):
        if _log_lines(path, event):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path.name} never logged {event!r}")


@pytest.mark.slow
async def test_a_worker_whose_consumer_is_deleted_and_recreate_blocked_rejoins_and_works(
    make_fabric: MakeFabric,
) -> None:
    """The wedge of issue 13: the worker's consumer is deleted while it idles (its fetches
    only time out) and its first re-creates fail. It must keep trying, stay silent
    meanwhile (no work is routed to a worker that cannot take it), then rejoin and run
    work again: the same process, no restart."""
    fabric = make_fabric(workers=1)
    wid, proc = fabric.worker_ids[0], fabric.worker_procs[0]
    log = (fabric.log_dir or Path()) / "worker-0.log"
    async with await connect(fabric, 1) as fm:
        first = await fm.submit(map_then_count("before", [{"text": "a"}], "text.upper", count=None))
        assert (await fm.wait(first, timeout=60)).state == "completed"

        js = fm.bus.js
        blocker = f"blocker{os.getpid()}"
        # as the scheduler's reclaim does: the worker's consumer goes; and a consumer of
        # someone else filtered on its subject makes its re-create fail (err 10100)
        await js.delete_consumer(streams.STREAM_ASSIGN, streams.worker_consumer_name(wid))
        await js.add_consumer(
            streams.STREAM_ASSIGN,
            ConsumerConfig(
                durable_name=blocker,
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=subjects.assign(wid),
            ),
        )
        try:
            await _wait_for_log(log, "rejoin failed; will retry", timeout=30)
            # without a consumer it announces nothing: the scheduler takes it for dead
            # (--dead-after 2) and routes no work to it, instead of sending work that
            # would wait (it kept heartbeating before, and every tenant stalled)
            for _ in range(300):
                if wid not in {w.worker for w in await fm.workers()}:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("a worker with no consumer still announces itself")
            for _ in range(30):  # and stays silent (it beats every second when it does)
                await asyncio.sleep(0.1)
                assert wid not in {w.worker for w in await fm.workers()}, "it announced itself"
        finally:
            await js.delete_consumer(streams.STREAM_ASSIGN, blocker)
        # it re-creates its consumer by itself once nothing blocks it any more
        for _ in range(300):
            try:
                info = await js.consumer_info(
                    streams.STREAM_ASSIGN, streams.worker_consumer_name(wid)
                )
                break
            except NotFoundError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the worker never re-created its consumer")
        assert info.config.filter_subject == subjects.assign(wid)

        data = [{"text": f"x{i}"} for i in range(6)]
        after = await fm.submit(map_then_count("after", data, "text.upper", count=None))
        assert (await fm.wait(after, timeout=90)).state == "completed"
        states = [codec.decode(v, OpState) for _, v, _ in await fm.bus.kv_items(streams.KV_OPS)]
        assert any(st.workflow_id == after and st.worker == wid for st in states)
    assert proc.poll() is None  # the same process did it
