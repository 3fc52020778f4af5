"""A tenant's `cancel` through the gateway reaches the planners on `--bus kafka`: they
listen for cancels on a Kafka topic there, not on core NATS."""

from __future__ import annotations

import asyncio

import pytest

from flowmesh.engine.gateway import Gateway
from flowmesh.topics import Bus, codec
from flowmesh.topics.api import SubmitRequest, WorkflowRequest
from flowmesh.topics.store.cas import open_cas
from tests.conftest import MakeFabric, connect
from tests.test_e2e import records, slow_spec

pytest.importorskip("aiokafka", reason="the kafka extra is not installed")
from tests.test_kafka_bus import kafka_broker, on_kafka

__all__ = ["kafka_broker", "on_kafka"]


@pytest.mark.slow
async def test_a_tenant_cancels_through_the_gateway_on_kafka(
    on_kafka: str, make_fabric: MakeFabric
) -> None:
    fabric = make_fabric(workers=1)
    async with await connect(fabric, 1) as fm:
        bus = await Bus.connect(fabric.nats_url, name="gw-test")
        try:
            gw = Gateway(bus, await open_cas(fabric.cas_url, bus.js))
            spec = slow_spec("cancel", records(30), delay=0.3, count=False)
            reply = await gw.dispatch("a", "submit", codec.encode(SubmitRequest(spec=spec)))
            wf = reply.workflow_id
            await asyncio.sleep(1.0)
            answer = await gw.dispatch("a", "cancel", codec.encode(WorkflowRequest(wf)))
            assert answer["state"] == "cancelled", answer
            status = await fm.status(wf)
            assert status is not None and status.nodes["slow"].done < 30
        finally:
            await bus.close()
