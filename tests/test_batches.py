"""The batch is the unit on the bus (issue 13 item 1): the messages that carry chunks of
operators, and the pipelined compare-and-set writes that keep per-key state exact.
Real nats-server for the writes."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.js.api import KeyValueConfig

from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.bus.nats import KVWriteError
from flowmesh.topics.messages import (
    Assignment,
    DoneBatch,
    OpDone,
    OpSpec,
    ReadyChunk,
    ReadyOp,
    chunks_of,
)
from flowmesh.workers.runtime import DONE_MESSAGE_BYTES, done_messages

BOUND_S = 15.0


def _op(i: int, batch_key: str = "bk", wf: str = "wf-a") -> ReadyOp:
    spec = OpSpec("map", "map.x", "1", "record", {"p": 1}, None, [f"{i:064x}"])
    return ReadyOp(
        key=f"k{i}",
        spec=spec,
        batch_key=batch_key,
        workflow_id=wf,
        tenant="t",
        attempt=i % 3,
        revision=100 + i,
        created_at=float(i),
        table="a" * 64 if i % 2 else None,
        row=i if i % 2 else -1,
    )


def test_a_chunk_carries_the_shared_spec_once_and_gives_back_every_operator() -> None:
    ops = [_op(i) for i in range(5)] + [_op(9, batch_key="other", wf="wf-b")]
    chunks = chunks_of(ops, 2, more=True)
    # one batch key per chunk, at most 2 operators each, in order
    assert [[it.key for it in c.items] for c in chunks] == [
        ["k0", "k1"],
        ["k2", "k3"],
        ["k4"],
        ["k9"],
    ]
    assert all(c.more and c.spec.inputs == [] for c in chunks)
    wire = [codec.decode(codec.encode(c), ReadyChunk) for c in chunks]
    assert [op for c in wire for op in c.ops] == ops
    # the spec's params travel once per chunk, not once per operator
    assert codec.encode(wire[0]).count(b'"p"') == 1


def test_an_assignment_is_one_batch_key() -> None:
    ops = [_op(i) for i in range(3)]
    a = Assignment.of("b1", "w1", ops, 1.0)
    assert codec.decode(codec.encode(a), Assignment).ops == ops
    with pytest.raises(ValueError, match="one batch key"):
        Assignment.of("b2", "w1", [_op(0), _op(1, batch_key="other")], 1.0)


def test_a_batchs_completions_fit_in_bounded_messages_with_stable_ids() -> None:
    big = "x" * 4000  # a failed operator's traceback
    done = [OpDone(key=f"k{i}", status="failed", error="e", traceback=big) for i in range(200)]
    msgs = done_messages("b1", done)
    assert len(msgs) > 1
    assert all(len(codec.encode(m)) <= DONE_MESSAGE_BYTES + 5000 for _, m, _ in msgs)
    assert [d for _, m, _ in msgs for d in m.done] == done
    # the same announcement twice has the same ids (a replay is a duplicate); a later
    # commit of the same keys (another ended_at) is not
    assert [i for *_, i in done_messages("b1", done)] == [i for *_, i in msgs]
    later = [msgspec.structs.replace(d, ended_at=1.0) for d in done]
    assert {i for *_, i in done_messages("b1", later)}.isdisjoint(i for *_, i in msgs)
    assert isinstance(msgs[0][1], DoneBatch)


async def test_pipelined_compare_and_set_writes_report_each_conflict(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test-kv-write-many")
    try:
        kv = await bus.kv(streams.KV_OPS)
        await kv.put("taken", b"someone else's")
        revs = await asyncio.wait_for(
            bus.kv_write_many(streams.KV_OPS, [("a", b"1", 0), ("taken", b"2", 0), ("b", b"3", 0)]),
            BOUND_S,
        )
        # created where absent; the existing key is a conflict, not an error
        assert revs[0] and revs[2] and revs[1] is None
        assert (await kv.get("taken")).value == b"someone else's"
        assert revs[0] is not None and revs[2] is not None
        # compare-and-set: the right revision wins, a stale one is refused
        again = await bus.kv_write_many(
            streams.KV_OPS, [("a", b"1b", revs[0]), ("b", b"3b", revs[2] - 1 or 999)]
        )
        assert again[0] is not None and again[1] is None
        assert (await kv.get("a")).value == b"1b" and (await kv.get("b")).value == b"3"
        # of many writers of one key from the same revision, exactly one wins
        racers = await bus.kv_write_many(
            streams.KV_OPS, [("a", f"r{i}".encode(), again[0]) for i in range(20)]
        )
        assert sum(r is not None for r in racers) == 1
        # a write the server refuses for another reason is an error, not a conflict
        await bus.js.create_key_value(KeyValueConfig(bucket="small", max_value_size=8))
        with pytest.raises(KVWriteError):
            await bus.kv_write_many("small", [("c", b"x" * 64, 0)])
    finally:
        await bus.close()


@pytest.mark.parametrize(
    "headers",
    [None, {"Nats-Expected-Last-Subject-Sequence": "0"}, {"Nats-Msg-Id": "ready-ab", "X-Y": "z"}],
)
def test_the_pipeline_builds_what_nats_py_would_send(headers: dict[str, str] | None) -> None:
    # the reply pipeline queues its requests' protocol commands itself: byte for byte
    # what nats-py's publish queues, and nats-py's own path for what it would refuse
    from nats.protocol import command

    from flowmesh.topics.bus.pipeline import _command

    payload = b'{"k": "v\r\n"}'
    got = _command("$KV.fm_ops.abc", "_INBOX.x.7", payload, headers)
    if headers is None:
        assert got == command.pub_cmd("$KV.fm_ops.abc", "_INBOX.x.7", payload)
    else:
        hdr = b"NATS/1.0\r\n"
        hdr += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
        assert got == command.hpub_cmd("$KV.fm_ops.abc", "_INBOX.x.7", hdr, payload)
    assert _command("a b", "_INBOX.x.7", payload, headers) is None
    assert _command("a\r\nPUB x 1", "_INBOX.x.7", payload, headers) is None
    assert _command("a", "_INBOX.x.7", payload, {"Bad:Key": "v"}) is None
    assert _command("a", "_INBOX.x.7", payload, {"K": "v\r\nPUB"}) is None


def test_the_scheduler_lingers_only_when_waiting_can_grow_the_batch() -> None:
    from typing import cast

    from flowmesh.engine.scheduler.live import Arrivals, Carrier, Held, Scheduler
    from flowmesh.engine.scheduler.policy import PolicyConfig

    sched = Scheduler(cast(Bus, None), config=PolicyConfig(linger_s=0.25))
    carrier = Carrier(msg=None, left=1, touched=0.0)

    def group(more: bool) -> list[Held]:
        return [Held(_op(0), carrier, 0.0, more)]

    now = 1000.0
    # a lone operator on an idle fabric (a chain's next stage): nothing else is coming
    sched.arrivals["bk"] = Arrivals()
    sched.arrivals["bk"].add(1, now)
    assert not sched._lingers("bk", group(more=False), now)
    assert not sched._lingers("bk", group(more=True), now)
    # its node's upstream still runs and operators of the key arrive fast: wait
    for i in range(50):
        sched.arrivals["bk"].add(1, now + i * 0.02)
    now += 1.0
    assert sched._lingers("bk", group(more=True), now)
    # ... but not when the planner says this node has nothing more to come
    assert not sched._lingers("bk", group(more=False), now)
    # the arrivals stopped a while ago: the rate decays, and waiting stops
    assert not sched._lingers("bk", group(more=True), now + 30.0)
    # linger off in the config: never
    off = Scheduler(cast(Bus, None), config=PolicyConfig(linger_s=0.0))
    off.arrivals = sched.arrivals
    assert not off._lingers("bk", group(more=True), now)
