"""A tenant's quotas hold across gateway processes (issue 17, item 3): two gateways on
one fabric share its running workflows, operators in flight and bytes stored (one KV
entry, compare-and-set), and split its request rate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowmesh.engine.gateway import ApiError, Gateway
from flowmesh.engine.quota import Ledger, Quotas
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import Bus, codec
from flowmesh.topics.api import SubmitRequest
from flowmesh.topics.store.cas import open_cas
from tests.conftest import MakeFabric, connect


def submit_body(name: str, rows: int, delay: float = 0.0) -> bytes:
    records = [{"text": f"{name} {i}", "colour": "red"} for i in range(rows)]
    spec = parse_spec(
        {
            "name": name,
            "datasets": {"src": {"records": records}},
            "nodes": [
                {"name": "up", "op": "map", "fn": "test.slow_upper", "input": "src",
                 "params": {"field": "text", "delay": delay}},
            ],
        }
    )  # fmt: skip
    return codec.encode(SubmitRequest(spec=spec))


async def submit(gw: Gateway, body: bytes) -> str:
    reply = await gw.dispatch("a", "submit", body)
    return str(reply.workflow_id)


async def refused(gw: Gateway, body: bytes) -> str:
    with pytest.raises(ApiError) as info:
        await gw.dispatch("a", "submit", body)
    assert info.value.code == "too_many_requests"
    return str(info.value)


async def test_two_gateways_share_one_tenants_quotas(make_fabric: MakeFabric) -> None:
    fabric = make_fabric(workers=1)
    fm = await connect(fabric, 1)
    buses = [await Bus.connect(fabric.nats_url, name=f"gw{i}") for i in range(2)]
    quotas = Quotas(workflows_running=1, stored_bytes=2_000)
    gws: list[Gateway] = []
    try:
        for bus in buses:
            gw = Gateway(bus, await open_cas(fabric.cas_url, bus.js), quotas=quotas)
            await gw.start()
            gws.append(gw)
        one, two = gws

        # one workflow running, admitted by the first gateway: the second refuses the next
        slow = await submit(one, submit_body("slow", 3, delay=1.0))
        message = await refused(two, submit_body("next", 1))
        assert "1 workflows running; the quota is 1" in message
        # ... and so does the first: one entry for the tenant, not one per process
        await refused(one, submit_body("next", 1))

        # once it has finished, its datasets and outputs count as bytes stored
        await fm.wait(slow, timeout=60)
        small = await submit(two, submit_body("small", 1))
        ledger = Ledger(buses[0], quotas)
        for _ in range(100):  # its outputs are added by a task of the gateway
            use, _ = await ledger.read("a")
            if not use.unsized:
                break
            await asyncio.sleep(0.05)
        slow_out = await ledger.output_bytes(slow)
        records = [{"text": f"slow {i}", "colour": "red"} for i in range(3)]
        upper = [{**r, "text": str(r["text"]).upper()} for r in records]
        assert slow_out == sum(len(codec.encode(r)) for r in upper)
        assert use.stored_bytes == len(codec.encode(records)) + slow_out
        assert list(use.running) == [small]
        await fm.wait(small, timeout=60)

        # the bytes stored quota: a dataset that would take the tenant past it is
        # refused at submit, whichever gateway takes it, naming the figures
        message = await refused(one, submit_body("big", 80))
        assert "bytes stored" in message and "the quota is 2000" in message, message
        assert "bytes stored" in await refused(two, submit_body("big", 80))

        # the rate is split among the live gateways (these two and the engine's own):
        # each allows a third of the burst
        assert [await gw.peers.beat() for gw in gws] == [3, 3]
        admitted = 0
        for _ in range(200):
            use = one._admit("a-flood")
            if use is not None:
                use.active -= 1  # answered at once: only the rate holds it back
                admitted += 1
        assert admitted in (34, 35), admitted  # ceil(100 / 3), and a token refilled
    finally:
        for gw in gws:
            await gw.stop()
        for bus in buses:
            await bus.close()
        await fm.close()


async def test_concurrent_submissions_through_two_gateways_never_pass_the_quota(
    make_fabric: MakeFabric,
) -> None:
    """Ten submissions at once, five through each gateway, with room for three: three
    are admitted (compare-and-set: no lost update lets a fourth in)."""
    fabric = make_fabric(workers=1)
    fm = await connect(fabric, 1)
    buses = [await Bus.connect(fabric.nats_url, name=f"gw{i}") for i in range(2)]
    quotas = Quotas(workflows_running=3)
    try:
        gws = [Gateway(bus, await open_cas(fabric.cas_url, bus.js), quotas=quotas) for bus in buses]

        async def one(i: int) -> Any:
            try:
                return await submit(gws[i % 2], submit_body(f"c{i}", 2, delay=1.0))
            except ApiError as exc:
                return exc

        outcomes = await asyncio.gather(*(one(i) for i in range(10)))
        admitted = [o for o in outcomes if isinstance(o, str)]
        assert len(admitted) == 3, outcomes
        assert all(isinstance(o, ApiError) for o in outcomes if not isinstance(o, str))
        for wf in admitted:
            await fm.wait(wf, timeout=60)
    finally:
        for bus in buses:
            await bus.close()
        await fm.close()
