"""A Kafka-only fabric (issue 16 item 3): streams and KV on Kafka ($FLOWMESH_BUS=kafka,
$FLOWMESH_KV=kafka), the CAS on files, and no nats-server at all: the engine, the
workers and the client run the three-node workflow against a tansu broker alone."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric, free_port, reachable
from flowmesh.topics import streams
from flowmesh.topics.bus import transport
from tests import test_dedup, test_e2e, test_faults
from tests.conftest import PLUGINS, REPO
from tests.test_kafka_kv import kafka_broker  # noqa: F401 - the broker fixture

pytest.importorskip("aiokafka", reason="the kafka extra is not installed")
from aiokafka import AIOKafkaConsumer, TopicPartition

from flowmesh.topics.bus.kafka import KafkaStreams
from flowmesh.topics.bus.kafka_kv import PARTITIONS, changelog_topic


@pytest.fixture
def kafka_only(kafka_broker: str, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    """This process and every one it starts: streams and KV on the test's broker."""
    monkeypatch.setenv(transport.BUS_ENV, "kafka")
    monkeypatch.setenv(transport.KAFKA_ENV, kafka_broker)
    monkeypatch.setenv(transport.KV_ENV, "kafka")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
    return kafka_broker


def nats_servers_of(pid: int) -> list[int]:
    """The nats-server processes among `pid`'s children (the fabric's processes are)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid and "nats" in comm:
            out.append(int(entry.name))
    return out


MakeFabric = Callable[..., LocalFabric]


@pytest.fixture
def make_kafka_only(kafka_only: str, tmp_path: Path) -> Iterator[MakeFabric]:
    """conftest's make_fabric without its nats-server: every process is given a NATS URL
    nothing listens on, and none may use it."""
    nats_url = f"nats://127.0.0.1:{free_port()}"
    made: list[LocalFabric] = []

    def make(
        workers: int = 2,
        models: bool = False,
        worker_args: tuple[str, ...] = (),
        engine_args: tuple[str, ...] = (),
        planner_shards: int = 0,
    ) -> LocalFabric:
        fabric = LocalFabric(
            data_dir=tmp_path / "data",
            nats_url=nats_url,
            cas_url=f"file://{tmp_path / 'data' / 'cas'}",
            workers=workers,
            worker_args=[
                "--plugin",
                "fm_test_transforms",
                *([] if models else ["--no-models"]),
                *worker_args,
            ],
            engine_args=["--dead-after", "2", *engine_args],
            planner_shards=planner_shards,  # N: N shards, a scheduler and a gateway apart
        )
        made.append(fabric.start())
        return fabric

    yield make
    for fabric in made:
        fabric.stop()
        for log in sorted((fabric.log_dir or tmp_path).glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))


async def assert_no_nats(kafka_only: str, fabric: LocalFabric) -> None:
    """No nats-server was started, nothing answers at the URL the processes were given,
    and the KV buckets the workflow needs were written to their Kafka changelogs."""
    assert fabric.nats_proc is None
    assert not nats_servers_of(os.getpid())
    assert not reachable(fabric.nats_url)
    ks = await KafkaStreams.connect(kafka_only, "test-where")
    try:
        for bucket in ("fm_ops", "fm_wf", "fm_workers", "fm_requests"):
            tps = [TopicPartition(changelog_topic(bucket), p) for p in range(PARTITIONS)]
            ends = await ks.true_ends(tps)
            assert sum(ends.values()) > 0, bucket
    finally:
        await ks.close()


class Spy:
    def __init__(self, make: MakeFabric) -> None:
        self.make = make
        self.fabrics: list[LocalFabric] = []

    def __call__(self, **kwargs: Any) -> LocalFabric:
        self.fabrics.append(self.make(**kwargs))
        return self.fabrics[-1]


@pytest.mark.slow
async def test_three_node_workflow_on_kafka_only_runs_with_no_nats_server(
    kafka_only: str, make_kafka_only: MakeFabric
) -> None:
    spy = Spy(make_kafka_only)
    await test_e2e.test_three_node_workflow_matches_python(spy)
    assert all(spy.fabrics[0].alive().values()), spy.fabrics[0].alive()
    await assert_no_nats(kafka_only, spy.fabrics[0])


@pytest.mark.slow
async def test_engine_killed_on_kafka_only_restores_the_kv_owner_and_completes(
    kafka_only: str, make_kafka_only: MakeFabric
) -> None:
    """The engine runs the KV owner: killed mid-run, its successor restores every table
    from the changelogs, and the workflow completes."""
    spy = Spy(make_kafka_only)
    await test_e2e.test_engine_killed_mid_run_restarts_and_completes(spy)
    await assert_no_nats(kafka_only, spy.fabrics[0])


@pytest.mark.slow
async def test_overlapping_tenants_on_kafka_only_run_each_operator_once(
    kafka_only: str, make_kafka_only: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dedup across tenants, once per key, with the claims on the owner's table."""
    spy = Spy(make_kafka_only)
    await test_dedup.test_overlapping_tenants_run_each_unique_operator_once(
        spy, tmp_path, monkeypatch
    )
    await assert_no_nats(kafka_only, spy.fabrics[0])


async def read_ops_changelog(fm: FlowMesh, subject: str, stream: str) -> list[tuple[str, bytes]]:
    """test_faults.read_stream on Kafka-only: every record of the fm_ops changelog, in
    order per key, as (subject, data) with NATS KV's subject names. Nothing compacts a
    topic of tansu's memory storage during the test, so every transition is there."""
    assert fm.bus.kafka_kv is not None
    ks = fm.bus.kafka_kv.ks
    topic = changelog_topic(streams.KV_OPS)
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = await ks.true_ends(tps)
    consumer = AIOKafkaConsumer(bootstrap_servers=ks.bootstrap, enable_auto_commit=False)
    await asyncio.wait_for(consumer.start(), 10.0)
    out: list[tuple[str, bytes]] = []
    try:
        consumer.assign(tps)
        await asyncio.wait_for(consumer.seek_to_beginning(*tps), 10.0)
        todo = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 60.0
        while todo and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(*todo, timeout_ms=1000)).items():
                for rec in records:
                    if rec.offset < ends[tp]:
                        key = (rec.key or b"").decode()
                        out.append((f"$KV.{streams.KV_OPS}.{key}", rec.value or b""))
                    if rec.offset + 1 >= ends[tp]:
                        todo.discard(tp)
        assert not todo, f"changelog not read to its end: {todo}"
    finally:
        await consumer.stop()
    return out


async def no_history_needed(nats_url: str) -> None:
    """test_faults.keep_op_history on Kafka-only: the changelog keeps every revision."""


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_sigkill_storm_on_kafka_only_loses_nothing_commits_once_and_bills_once(
    kafka_only: str, make_kafka_only: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_faults.py's storm, shorter (10 worker kills, the engine and its KV owner
    once), Kafka-only: each operator's transitions are read from the fm_ops changelog."""
    monkeypatch.setattr(test_faults, "KILLS_WANTED", 10)
    monkeypatch.setattr(test_faults, "keep_op_history", no_history_needed)
    monkeypatch.setattr(test_faults, "read_stream", read_ops_changelog)
    spy = Spy(make_kafka_only)
    await test_faults.test_sigkill_storm_loses_nothing_commits_once_and_bills_once(spy, "")
    await assert_no_nats(kafka_only, spy.fabrics[0])


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_flags_alone_make_a_kafka_only_fabric(
    kafka_broker: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--bus kafka --kafka B --kv kafka` (LocalFabric hands them to every process as
    flags, as `flowmesh up` does), and a client told the same: no FLOWMESH_BUS, _KAFKA or
    _KV in anyone's environment, and still no nats-server."""
    from tests.workflows import map_then_count

    for var in (transport.BUS_ENV, transport.KAFKA_ENV, transport.KV_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=f"nats://127.0.0.1:{free_port()}",  # nothing listens: none may use it
        cas_url=f"file://{tmp_path / 'data' / 'cas'}",
        workers=1,
        worker_args=["--plugin", "fm_test_transforms", "--no-models"],
        bus="kafka",
        kafka=kafka_broker,
        kv="kafka",
    )
    assert fabric.kafka_only
    with fabric:
        fm = await FlowMesh.connect(fabric.nats_url, fabric.cas_url, kafka=kafka_broker, kv="kafka")
        try:
            for _ in range(600):  # the worker registers (its executors make the catalog)
                if await fm.workers():
                    break
                await asyncio.sleep(0.1)
            rows = [{"text": f"t{i}", "colour": "red" if i % 2 else "blue"} for i in range(6)]
            wf = await fm.submit(map_then_count("flags", rows, "text.upper"))
            status = await fm.wait(wf, timeout=120)
            assert status.state == "completed", status.error
        finally:
            await fm.close()
        await assert_no_nats(kafka_broker, fabric)
