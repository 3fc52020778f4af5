"""Every awaited publish on the bus ends: stored, or a clear error (issue 13 item 2).

With nats-py 2.16 a rejected PubAck (an expected-sequence conflict, a full stream with
discard=new) raises inside the client's reply handler and a `publish_async` future never
resolves; `Bus.publish_many` used to await those futures with no bound, so a worker's
`_finish` could hang forever while its lease was kept alive. Real nats-server throughout.
"""

from __future__ import annotations

import asyncio

import nats
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy, StreamConfig

from flowmesh.topics import Bus

# Far longer than any answer from a local server takes, far shorter than a hang.
BOUND_S = 15.0


async def _bus(url: str) -> Bus:
    nc = await nats.connect(url)
    return Bus(nc, nc.jetstream(timeout=5.0))


async def test_a_full_stream_fails_publish_many_instead_of_hanging(nats_url: str) -> None:
    bus = await _bus(nats_url)
    try:
        # room for one message; the next is refused (discard=new): a rejected PubAck
        await bus.js.add_stream(
            StreamConfig(name="FULL", subjects=["full.>"], max_msgs=1, discard=DiscardPolicy.NEW)
        )
        with pytest.raises(nats.js.errors.APIError):
            await asyncio.wait_for(
                bus.publish_many([("full.a", {"i": 1}, None), ("full.b", {"i": 2}, None)]),
                BOUND_S,
            )
        # the message that fitted is stored; nothing else was
        info = await bus.js.stream_info("FULL")
        assert info.state.messages == 1
        # and the bus still works for a stream with room
        await bus.js.add_stream(StreamConfig(name="ROOMY", subjects=["roomy.>"]))
        await asyncio.wait_for(
            bus.publish_many([("roomy.a", {"i": 1}, "m1"), ("roomy.b", {"i": 2}, "m2")]), BOUND_S
        )
        assert (await bus.js.stream_info("ROOMY")).state.messages == 2
    finally:
        await bus.close()


async def test_raw_publish_async_future_never_resolves_on_a_rejected_puback(
    nats_url: str,
) -> None:
    """The client behaviour the bus works around, for both rejections the issue names
    (an expected-sequence conflict, a full stream): if this starts failing, nats-py fixed
    its reply handler and publish_async could be used again."""
    bus = await _bus(nats_url)
    try:
        await bus.js.add_stream(StreamConfig(name="SEQ", subjects=["seq.>"]))
        await bus.js.publish("seq.x", b"first")  # the stream is at sequence 1
        conflict = await bus.js.publish_async(
            "seq.x", b"second", headers={"Nats-Expected-Last-Sequence": "5"}
        )
        # the same conflict through a plain (request) publish is an answer at once
        with pytest.raises(nats.js.errors.APIError) as info:
            await bus.js.publish("seq.x", b"second", headers={"Nats-Expected-Last-Sequence": "5"})
        assert info.value.err_code == 10071  # wrong last sequence
        done, _ = await asyncio.wait({conflict}, timeout=2.0)
        assert not done, "nats-py now resolves a rejected PubAck"
        conflict.cancel()
    finally:
        await bus.close()


async def test_publish_many_gives_up_within_its_bound_when_nobody_answers(
    nats_url: str,
) -> None:
    """A subject no stream holds (no responders) is an answer, not a wait."""
    bus = await _bus(nats_url)
    try:
        with pytest.raises((nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
            await asyncio.wait_for(
                bus.publish_many([("nowhere.a", {"i": 1}, None)], retry_s=1.0), BOUND_S
            )
    finally:
        await bus.close()
