"""The operator cache: list, stats, invalidate (work runs again), CAS garbage collection.

Executions are counted at the executor: `test.count_upper` appends a line to
$FM_COUNT_FILE in the worker process every time it really runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine import cache
from flowmesh.engine.client import FlowMesh
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.messages import NodeStatus, OpSpec, OpState, WorkflowStatus
from flowmesh.topics.store.cas import CAS, FileBackend, open_cas
from tests.conftest import MakeFabric, connect

REPO = Path(__file__).resolve().parent.parent
EXECUTOR = "map.test.count_upper"
N = 6


def rows(n: int = N) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"item {i}"} for i in range(n)]


def upper_spec(n: int = N) -> Any:
    return parse_spec(
        {
            "name": "cache-upper",
            "datasets": {"src": {"records": rows(n)}},
            "nodes": [
                {
                    "name": "up",
                    "op": "map",
                    "fn": "test.count_upper",
                    "input": "src",
                    "params": {"field": "text"},
                }
            ],
        }
    )


def executions(count_file: Path) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


async def run_once(fm: FlowMesh) -> tuple[str, list[dict[str, Any]]]:
    wf = await fm.submit(upper_spec())
    try:
        await fm.wait(wf, timeout=30)
    except TimeoutError as exc:
        # what a lost ready/done message looks like: JetStream drops a second message
        # with the same Nats-Msg-Id within the streams' duplicate window, so the ids
        # must differ for each incarnation of an operator key
        raise AssertionError(
            f"{wf} never completed: was a re-created operator's ready or done message "
            "taken for a duplicate?"
        ) from exc
    return wf, await fm.result(wf, "up")


def cli(fabric: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, FLOWMESH_NATS=fabric.nats_url, FLOWMESH_CAS=fabric.cas_url, COLUMNS="200"
    )
    return subprocess.run(
        [sys.executable, "-m", "flowmesh.engine.cli", "cache", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )


@pytest.mark.slow
async def test_invalidate_makes_work_run_again(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "count.txt"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))  # before the workers start
    fabric = make_fabric(workers=1)
    expected = [{**r, "text": r["text"].upper()} for r in rows()]
    async with await connect(fabric, 1) as fm:
        wf1, first = await run_once(fm)
        assert first == expected and executions(count_file) == N
        _, again = await run_once(fm)  # completed dedup: nothing runs
        assert again == expected and executions(count_file) == N

        # (c) ls / stats through the CLI
        ls = cli(fabric, "ls", "--json")
        assert ls.returncode == 0, ls.stderr
        listed = json.loads(ls.stdout)
        assert len(listed) == N
        assert {(e["spec"]["kind"], e["spec"]["executor"], e["state"]) for e in listed} == {
            ("map", EXECUTOR, "done")
        }
        version = listed[0]["spec"]["version"]
        assert version
        st = cli(fabric, "stats", "--json")
        assert st.returncode == 0, st.stderr
        stats = json.loads(st.stdout)
        assert stats["entries"] == N and stats["by_state"] == {"done": N}
        assert stats["by_executor"] == {f"{EXECUTOR}@{version}": N}
        table = cli(fabric, "ls", "--executor", EXECUTOR, "--limit", "2")
        assert table.returncode == 0 and EXECUTOR in table.stdout, table.stderr
        assert f"2 of {N} entries shown" in table.stdout
        assert await cache.entries(fm.bus, executor="map.nope") == []

        # no selector: refused
        with pytest.raises(cache.CacheError):
            await cache.invalidate(fm.bus)
        refused = cli(fabric, "invalidate")
        assert refused.returncode == 2 and "--all" in refused.stderr

        # (a) invalidate by executor: the same work runs again, with the same results
        gone = await cache.invalidate(fm.bus, executor=EXECUTOR, version=version)
        assert sorted(gone) == sorted(e["key"] for e in listed)
        assert gone.skipped_pending == [] and gone.changed == []
        assert await cache.entries(fm.bus) == []
        assert await fm.result(wf1, "up") == expected  # recorded results stay readable
        _, rerun = await run_once(fm)
        assert rerun == expected and executions(count_file) == 2 * N

        # (b) invalidate one key through the CLI: exactly one more execution
        key = (await cache.entries(fm.bus))[0].key
        one = cli(fabric, "invalidate", "--key", key)
        assert one.returncode == 0, one.stderr
        assert f"invalidated {key}" in one.stdout and one.stdout.count("invalidated") == 1
        assert len(await cache.entries(fm.bus)) == N - 1
        _, last = await run_once(fm)
        assert last == expected and executions(count_file) == 2 * N + 1

        # several matches without --yes: asks, and "no" changes nothing
        no = cli(fabric, "invalidate", "--all", stdin="n\n")
        assert no.returncode == 1 and "Aborted" in no.stderr
        assert len(await cache.entries(fm.bus)) == N


@pytest.mark.slow
async def test_gc_keeps_what_results_need(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "count.txt"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))
    fabric = make_fabric(workers=1)
    async with await connect(fabric, 1) as fm:
        wf1, first = await run_once(fm)
        # an invalidated entry: its record lives on through wf1's node manifest (a small
        # result is listed inline in its entry: it has no output manifest of its own)
        gone = (await cache.entries(fm.bus))[0]
        assert await cache.invalidate(fm.bus, key=gone.key) == [gone.key]
        orphan = await fm.cas.put(b"nothing refers to me")
        # default grace: a young unreferenced blob survives
        young = await cache.gc(fm.bus, fm.cas)
        assert young.deleted == 0 and young.young >= 1 and await fm.cas.exists(orphan)
        assert young.missing == {} and young.dangling_ops == []
        dry = await cache.gc(fm.bus, fm.cas, grace_s=0, dry_run=True)
        assert gone.output is None and gone.outputs
        assert set(dry.deleted_digests) == {orphan}
        assert await fm.cas.exists(orphan)

        out = cli(fabric, "gc", "--grace", "0")
        assert out.returncode == 0, out.stderr
        assert not await fm.cas.exists(orphan)
        assert "deleted 1 unreferenced" in out.stdout, out.stdout
        assert await fm.result(wf1, "up") == first
        # what the cache still serves is intact: a new workflow reuses it (one op runs:
        # the invalidated one)
        _, again = await run_once(fm)
        assert again == first and executions(count_file) == N + 1
        after = await cache.gc(fm.bus, fm.cas, grace_s=0)
        assert after.deleted == 0 and after.missing == {}

        # a cache entry whose result blob was removed behind our back is reported, and
        # invalidated on request, instead of being served
        victim = (await cache.entries(fm.bus))[0]
        assert victim.outputs
        await fm.cas.delete(victim.outputs[0])
        rep = await cache.gc(fm.bus, fm.cas, dry_run=True)
        assert victim.outputs[0] in rep.missing and rep.dangling_ops == [victim.key]
        rep = await cache.gc(fm.bus, fm.cas, invalidate_dangling=True)
        assert rep.invalidated == [victim.key]
        _, healed = await run_once(fm)
        assert healed == first and executions(count_file) == N + 2


# --- units: CAS.list and gc on both backends -------------------------------------------


@pytest.fixture(params=["file", "nats"])
async def bus_cas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Bus, CAS]]:
    bus = await Bus.connect(request.getfixturevalue("nats_url"), name="test-cache")
    if request.param == "file":
        yield bus, CAS(FileBackend(tmp_path / "cas"))
    else:
        yield bus, await open_cas("nats:", bus.js)
    await bus.close()


async def test_cas_list(bus_cas: tuple[Bus, CAS], tmp_path: Path) -> None:
    _, cas = bus_cas
    assert [item async for item in cas.list()] == []  # an empty store
    t0 = time.time()
    digests = {await cas.put(f"blob {i}".encode()) for i in range(3)}
    listed = {d: m async for d, m in cas.list()}
    assert set(listed) == digests
    assert all(t0 - 5 < m < time.time() + 5 for m in listed.values())
    gone = sorted(digests)[0]
    await cas.delete(gone)
    assert {d async for d, _ in cas.list()} == digests - {gone}
    if isinstance(cas.backend, FileBackend):
        # a put in progress is not a blob yet
        keep = sorted(digests)[1]
        (cas.backend._path(keep).parent / ".tmp-abc").write_bytes(b"partial")
        assert {d async for d, _ in cas.list()} == digests - {gone}
    for d in digests - {gone}:
        await cas.delete(d)
    assert [item async for item in cas.list()] == []  # only deletions left


async def test_gc_live_set(bus_cas: tuple[Bus, CAS]) -> None:
    bus, cas = bus_cas
    r1, r2, r3 = [await cas.put_record({"i": i}) for i in range(3)]
    m_in = await cas.put_manifest([r1, r2])
    m_out = await cas.put_manifest([r3])
    weights = await cas.put(b"weights")
    model = await cas.put_record({"name": "tiny", "files": {"w.bin": weights}})
    orphan = await cas.put(b"orphan")
    spec = OpSpec(
        kind="group",
        executor="group",
        version="1",
        fanout="all",
        params={},
        model=model,
        inputs=[m_in],
    )
    op = OpState(
        key="a" * 64,
        state="done",
        spec=spec,
        workflow_id="wf",
        tenant="t",
        created_at=time.time(),
        output=m_out,
        outputs=None,  # large: only the manifest lists them
        n_outputs=1,
    )
    await (await bus.kv(streams.KV_OPS)).put(op.key, codec.encode(op))
    table = await cas.put_table([{"i": 0}])
    missing = "b" * 64
    wf = WorkflowStatus(
        workflow_id="wf",
        name="w",
        tenant="t",
        state="completed",
        submitted_at=0.0,
        updated_at=0.0,
        nodes={"n": NodeStatus(complete=True, output=missing)},
        tables={"src": table},
    )
    await (await bus.kv(streams.KV_WF)).put("wf", codec.encode(wf))
    weights2 = await cas.put(b"other weights")
    model2 = await cas.put_record({"name": "m2", "files": {"w.bin": weights2}})
    await (await bus.kv(streams.KV_MODELS)).put("m2", model2.encode())

    live = await cache.live_set(bus, cas)
    assert {r1, r2, r3, m_in, m_out, weights, model, table, weights2, model2} <= live
    assert orphan not in live

    rep = await cache.gc(bus, cas, grace_s=0)
    assert rep.deleted == 1 and rep.deleted_digests == [orphan]
    assert rep.missing == {missing: "fm_wf wf node n output"}  # reported, no crash
    assert rep.kept == 10 and rep.young == 0
    assert not await cas.exists(orphan)
    for d in (r1, r2, r3, m_in, m_out, weights, model, table, weights2, model2):
        assert await cas.exists(d)
