"""The planner's completion waves on a real nats-server, with real scheduler and worker
processes: a wave the bus refuses partway is done again (issue 13, no operator lost), and
cancelling a workflow detaches only that workflow from operators it shares (issue 17)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric
from flowmesh.engine.planner import Planner
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.bus.nats import KVWriteError
from flowmesh.topics.messages import OP_CANCELLED, ReadyChunk
from flowmesh.topics.store.cas import open_cas
from tests.conftest import MakeFabric, NatsServer, connect
from tests.test_e2e import op_states
from tests.workflows import map_then_count

pytestmark = pytest.mark.slow

PLUGINS = Path(__file__).resolve().parent / "plugins"


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"item {i}", "colour": "red" if i % 3 else "blue"} for i in range(n)]


def two_maps(name: str, data: list[dict[str, Any]]) -> Any:
    """upper-case `text`, then prefix it: the second node's operators are started by the
    completion waves of the first."""
    return parse_spec(
        {
            "name": name,
            "datasets": {"src": {"records": data}},
            "nodes": [
                {
                    "name": "up",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "src",
                    "params": {"field": "text"},
                },
                {
                    "name": "tagged",
                    "op": "map",
                    "fn": "text.template",
                    "input": "up",
                    "params": {"output_field": "tag", "template": "<{text}>"},
                },
            ],
        }
    )


@pytest.fixture
async def planner_apart(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FlowMesh, Planner, Bus]]:
    """A scheduler and a worker as processes, the planner in this process on a bus of its
    own (so a test can refuse its writes), and a client."""
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS))
    cas_url = f"file://{tmp_path / 'data' / 'cas'}"
    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=nats_server.url,
        cas_url=cas_url,
        workers=1,
        worker_args=["--plugin", "fm_test_transforms", "--no-models"],
        engine_args=["--dead-after", "2"],
    )
    bus = await Bus.connect(nats_server.url, name="planner-under-test")
    planner: Planner | None = None
    try:
        fabric.start_scheduler()
        fabric.start_worker()
        planner = Planner(bus, await open_cas(cas_url, bus.js))
        await planner.start()
        async with await FlowMesh.connect(nats_server.url, cas_url) as fm:
            for _ in range(600):
                if await fm.workers():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the worker did not register")
            yield fm, planner, bus
    finally:
        if planner is not None:
            await planner.stop()
        await bus.close()
        fabric.stop()
        for log in sorted((tmp_path / "data" / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))


def refuse(
    real: Callable[..., Awaitable[Any]], times: int, applies: Callable[..., bool], error: Exception
) -> tuple[Callable[..., Awaitable[Any]], list[int]]:
    """`real`, except that its first `times` calls for which `applies(*args)` raise."""
    refused = [0]

    async def call(*args: Any, **kwargs: Any) -> Any:
        if refused[0] < times and applies(*args):
            refused[0] += 1
            raise error
        return await real(*args, **kwargs)

    return call, refused


def _readies_of(fn: str) -> Callable[..., bool]:
    def applies(items: list[tuple[str, Any, str | None]], *_: Any) -> bool:
        return any(isinstance(m, ReadyChunk) and m.spec.executor.endswith(fn) for _, m, _ in items)

    return applies


def _claims_after_the_first() -> Callable[..., bool]:
    """Claim writes in KV fm_ops, after the first (the source's fan-out, at intake): those
    of completion waves."""
    seen = [0]

    def applies(bucket: str, *_: Any) -> bool:
        if bucket != streams.KV_OPS:
            return False
        seen[0] += 1
        return seen[0] > 1

    return applies


def _manifests_of(n: int) -> Callable[..., bool]:
    """Manifests of n operator outputs (a record node completing), not the source's."""
    seen = [0]

    def applies(digests: list[str], *_: Any) -> bool:
        if len(digests) != n:
            return False
        seen[0] += 1
        return seen[0] > 2  # the source's: its records at intake, then on completing

    return applies


@pytest.mark.parametrize("seam", ["ready publish", "claims", "node manifest", "source table"])
async def test_a_completion_wave_refused_partway_is_done_again_without_a_restart(
    planner_apart: tuple[FlowMesh, Planner, Bus], seam: str
) -> None:
    """The bus refuses the fan-out of a completion wave (the children's ready chunks, or
    their claims in KV fm_ops) twice, or the store a completing node's manifest, or the
    source table as the submission is accepted. The wave's completions were already
    taken (the submission already accepted): before, the workflow stayed `running` until
    the planner restarted. Now the refused step is done again and the workflow
    completes, every record in it."""
    fm, planner, bus = planner_apart
    if seam == "ready publish":
        # a timeout, as a publish to a server that does not answer raises it
        bus.publish_many, refused = refuse(  # type: ignore[method-assign]
            bus.publish_many, 2, _readies_of("text.template"), TimeoutError("injected")
        )
    elif seam == "claims":
        bus.kv_write_many, refused = refuse(  # type: ignore[method-assign]
            bus.kv_write_many, 2, _claims_after_the_first(), KVWriteError("injected")
        )
    elif seam == "node manifest":
        # the object store out for longer than its own retries, as a node completes
        planner.cas.put_manifest, refused = refuse(  # type: ignore[method-assign]
            planner.cas.put_manifest, 2, _manifests_of(24), TimeoutError("injected")
        )
    else:
        # the same as a submission is accepted: it is read again
        planner.cas.get_table, refused = refuse(  # type: ignore[method-assign]
            planner.cas.get_table, 2, lambda *_: True, TimeoutError("injected")
        )
    data = rows(24)
    spec = two_maps("refused", data)
    counted = _submitted(spec.tenant)
    wf = await fm.submit(spec)
    status = await fm.wait(wf, timeout=60)
    assert refused[0] == 2, "the fault was not injected"
    assert status.state == "completed", status
    # accepted once, however often its accept was tried
    assert _submitted(spec.tenant) - counted == 1
    tagged = await fm.result(wf, "tagged")
    assert tagged == [
        {**r, "text": r["text"].upper(), "tag": f"<{r['text'].upper()}>"} for r in data
    ]
    assert not planner.retries and not planner.waiters


async def test_ready_operators_carry_what_their_inputs_weigh(
    planner_apart: tuple[FlowMesh, Planner, Bus],
) -> None:
    """The scheduler prices fetching an operator's inputs (the utility's locality term):
    the planner tells it what they weigh. A map over a dataset reads one source record
    (its canonical JSON); the next map reads one record the first produced, weighed as
    the worker stored it (each committed operator's output_bytes)."""
    fm, _planner, bus = planner_apart
    sent: list[ReadyChunk] = []
    publish_many = bus.publish_many

    async def seen(items: list[tuple[str, Any, str | None]], *a: Any) -> None:
        sent.extend(m for _, m, _ in items if isinstance(m, ReadyChunk))
        await publish_many(items, *a)

    bus.publish_many = seen  # type: ignore[method-assign]
    data = rows(12)
    wf = await fm.submit(two_maps("weighed", data))
    assert (await fm.wait(wf, timeout=60)).state == "completed"
    by_node = {c.spec.executor.split(".", 1)[1]: [it.input_bytes for it in c.items] for c in sent}
    source = [len(codec.canonical(r)) for r in data]
    assert set(by_node["text.upper"]) == {int(sum(source) / len(source))}
    produced = [st.output_bytes for st in await op_states(fm) if st.spec.executor.endswith("upper")]
    assert len(produced) == 12 and min(produced) > 0
    assert set(by_node["text.template"]) == {int(sum(produced) / len(produced))}
    # a group reads every record of its input node: their whole weight
    grouped = [{"id": i, "text": f"g {i}", "colour": "red" if i % 2 else "blue"} for i in range(8)]
    sent.clear()
    wf = await fm.submit(map_then_count("weighed-group", grouped, "text.upper"))
    assert (await fm.wait(wf, timeout=60)).state == "completed"
    (group,) = [c for c in sent if c.spec.kind == "group"]
    upper = {st.key: st.output_bytes for st in await op_states(fm)}
    mapped = [upper[k] for c in sent if c.spec.kind == "map" for k in (it.key for it in c.items)]
    assert len(mapped) == 8 and [it.input_bytes for it in group.items] == [sum(mapped)]


def _submitted(tenant: str) -> float:
    """The planner's flowmesh_workflows_submitted_total for `tenant`, in this process."""
    from prometheus_client import REGISTRY

    got = REGISTRY.get_sample_value("flowmesh_workflows_submitted_total", {"tenant": tenant})
    return got or 0.0


async def test_cancel_detaches_one_workflow_from_operators_it_shares(
    make_fabric: MakeFabric,
) -> None:
    """Workflow A claims 16 slow operators; B (same tenant, global dedup scope) asks for 8
    of them while they run, and joins them. Cancelling A used to commit the shared ones
    `failed` and fail B with them. Now B completes with every record right, and only
    the operators no one else waits for stay stopped."""
    fabric = make_fabric(workers=1)
    a_rows = rows(16)
    b_rows = a_rows[:8]
    async with await connect(fabric, 1) as fm:
        a = await fm.submit(map_then_count("a", a_rows, "test.slow_upper", count=None, delay=0.25))
        # B joins A's operators while they are queued or running
        for _ in range(200):
            states = await op_states(fm)
            if len(states) == 16:
                break
            await asyncio.sleep(0.05)
        b = await fm.submit(map_then_count("b", b_rows, "test.slow_upper", count=None, delay=0.25))
        await asyncio.sleep(1.0)  # a few of A's operators run, the batch is in hand
        assert await fm.cancel(a) == "cancelled"
        status = await fm.wait(b, timeout=90)
        assert status.state == "completed", status
        assert await fm.result(b, "up") == [{**r, "text": r["text"].upper()} for r in b_rows]
        a_status = await fm.status(a)
        assert a_status is not None and a_status.state == "cancelled"
        # B's operators all ran to the end; only operators no one else waited for
        # stayed stopped
        b_status = await fm.status(b)
        assert b_status is not None and b_status.nodes["up"].ops is not None
        b_keys = set(await fm.cas.get_manifest(b_status.nodes["up"].ops))
        states = {s.key: s for s in await op_states(fm)}
        assert all(states[k].state == "done" for k in b_keys)
        stopped = {k for k, s in states.items() if s.state == "failed"}
        assert stopped, "no operator of the cancelled workflow was stopped"
        assert not stopped & b_keys
        assert all(states[k].error == OP_CANCELLED for k in stopped)


def chain(name: str, tenant: str, data: list[dict[str, Any]]) -> Any:
    """d -> up_q -> up_a, as in the fault storm (global dedup scope: shared across tenants)."""
    return parse_spec(
        {
            "name": name,
            "tenant": tenant,
            "datasets": {"d": {"records": data}},
            "nodes": [
                {
                    "name": "up_q",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "d",
                    "params": {"field": "q"},
                },
                {
                    "name": "up_a",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "up_q",
                    "params": {"field": "a"},
                },
            ],
        }
    )


async def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_child_node_never_completes_before_a_completion_wave_counted_its_records(
    nats_url: str, tmp_path: Path
) -> None:
    """The fault storm once completed a workflow with 6 of its 16 up_a records missing:
    the 6 records every tenant shares. Replayed here step by step, no timing involved:
    workflow Y (another tenant) joins X's in-flight up_q operators; their completions
    come as one wave, which takes both workflows' waiters and starts X's up_a children
    first (held at the publish); meanwhile Y's own intake finishes and completes Y's
    source, so Y's up_q completes too. If the wave had not yet counted Y's up_a children
    pending, Y's up_a would complete then, empty, and Y with it. It must wait for them."""
    from flowmesh.topics.messages import OpDone

    data = [{"id": i, "q": f"q {i}", "a": f"a {i}"} for i in range(2)]
    cas_url = f"file://{tmp_path / 'cas'}"
    bus = await Bus.connect(nats_url, name="planner-under-test")
    cas = await open_cas(cas_url, bus.js)
    await (await bus.kv(streams.KV_EXECUTORS)).put("map.text.upper", b"v1")
    planner = Planner(bus, cas)
    await planner.start()
    x_held, x_gate = asyncio.Event(), asyncio.Event()
    y_held, y_gate = asyncio.Event(), asyncio.Event()
    publish_many, kv_write_many = bus.publish_many, bus.kv_write_many

    async def held_publish(items: list[tuple[str, Any, str | None]], *a: Any) -> None:
        chunks = [m for _, m, _ in items if isinstance(m, ReadyChunk)]
        if any(
            c.spec.params.get("field") == "a" and c.items[0].workflow_id == "wf-x" for c in chunks
        ):
            x_held.set()
            await x_gate.wait()
        await publish_many(items, *a)

    async def held_write(bucket: str, writes: list[Any], *a: Any) -> Any:
        if bucket == streams.KV_REQUESTS and any(k.endswith(".wf-y") for k, *_ in writes):
            y_held.set()
            await y_gate.wait()
        return await kv_write_many(bucket, writes, *a)

    try:
        async with await FlowMesh.connect(nats_url, cas_url) as fm:
            await fm.submit(chain("x", "acme", data), "wf-x", check_executors=False)
            await _until(lambda: "wf-x" in planner.runs and not planner._accepts, "X's intake")
            up_q_keys = list(planner.runs["wf-x"].nodes["up_q"].keys.values())
            bus.publish_many = held_publish  # type: ignore[method-assign]
            bus.kv_write_many = held_write  # type: ignore[method-assign]
            await fm.submit(chain("y", "globex", data), "wf-y", check_executors=False)
            await y_held.wait()  # Y's up_q waiters joined X's operators
            y = planner.runs["wf-y"]
            assert y.nodes["up_q"].status.reused == 2
            # X's up_q operators complete, as one wave
            outs = await cas.put_records([{**r, "q": r["q"].upper()} for r in data])
            dones = [
                OpDone(key=k, status="done", outputs=[d])
                for k, d in zip(up_q_keys, outs, strict=True)
            ]
            wave = asyncio.create_task(planner.complete_keys(dones))
            await x_held.wait()  # the wave is starting X's up_a children
            y_gate.set()  # Y's intake finishes: its source, then its up_q, complete
            await _until(lambda: not planner._accepts, "Y's intake")
            assert y.nodes["up_q"].complete
            assert not y.nodes["up_a"].complete, "Y's up_a completed without its records"
            assert y.nodes["up_a"].pending == 2 and y.state == "running"
            x_gate.set()
            await wave
            # and the up_a operators (shared by both) complete: both workflows end whole
            up_a_keys = set(planner.runs["wf-x"].nodes["up_a"].keys.values())
            assert up_a_keys == set(y.nodes["up_a"].keys.values())
            outs = await cas.put_records([{"a": f"A {i}"} for i in range(len(up_a_keys))])
            await planner.complete_keys(
                [
                    OpDone(key=k, status="done", outputs=[d])
                    for k, d in zip(up_a_keys, outs, strict=True)
                ]
            )
            for wf in ("wf-x", "wf-y"):
                status = await fm.wait(wf, timeout=20)
                assert status.state == "completed"
                assert status.nodes["up_a"].n_outputs == 2, wf
    finally:
        x_gate.set()
        y_gate.set()
        await planner.stop()
        await bus.close()
