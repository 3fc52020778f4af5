"""Scale-out: planner shards, and the fabric on a 3-server NATS cluster.

The cluster test runs 2 planner shards, a scheduler, a gateway and 2 workers (real
processes, `LocalFabric` with `planner_shards=2`) on 3 routed nats-servers with every
stream, KV bucket and the object-store CAS at 3 replicas. Mid-run one nats-server and
one planner shard are SIGKILLed; the shard is restarted by the fabric's supervisor, the
server stays dead. The invariants are then checked from the bus's own records, the way
tests/test_faults.py checks them: every workflow completes with the right results, no
operator is lost, each is committed exactly once and announced once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.js.api import KeyValueConfig, StorageType

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric
from flowmesh.engine.shards import check_shard, done_consumer_name, shard_of
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.config.creds import Creds, redact_url, url_with_creds
from flowmesh.topics.messages import DoneBatch, OpState, WorkflowStatus
from flowmesh.topics.store.cas import open_cas
from tests.conftest import PLUGINS, REPO, NatsCluster, NatsServer, connect
from tests.test_faults import dataset, expected, read_stream, workflow


def test_a_workflow_belongs_to_one_shard_and_shards_share_the_load() -> None:
    ids = [f"wf-{i:05d}" for i in range(2000)]
    for n in (1, 2, 3, 5):
        owners = [shard_of(wf, n) for wf in ids]
        assert owners == [shard_of(wf, n) for wf in ids]  # the same every time
        counts = [owners.count(s) for s in range(n)]
        assert all(abs(c - len(ids) / n) < 0.1 * len(ids) / n for c in counts), counts
    assert shard_of("anything", 1) == 0


def test_every_process_agrees_on_the_shard_of_a_workflow() -> None:
    """Shards are separate processes: the hash must not vary per process (str hash()
    does, with PYTHONHASHSEED)."""
    code = (
        "from flowmesh.engine.shards import shard_of; "
        "print([shard_of(f'wf{i}', 3) for i in range(64)])"
    )
    here = str([shard_of(f"wf{i}", 3) for i in range(64)])
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == here


def test_each_shard_has_its_own_completion_consumer() -> None:
    assert done_consumer_name(0, 1) == streams.PLANNER_DONE  # the all-in-one engine's
    names = {done_consumer_name(s, n) for n in (2, 3) for s in range(n)}
    assert len(names) == 5 and streams.PLANNER_DONE not in names
    for shard, shards in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            check_shard(shard, shards)


async def keep_op_history_r3(url: str) -> None:
    """fm_ops made before any component makes it, keeping 64 revisions per key (as
    tests/test_faults.py does), at 3 replicas like everything else here; then every
    other stream and bucket, so the processes do not all create them at once on a
    freshly formed cluster (on a loaded box that outlasts a client's API timeout)."""
    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream(timeout=30.0)
        await js.create_key_value(
            KeyValueConfig(bucket=streams.KV_OPS, history=64, storage=StorageType.FILE, replicas=3)
        )
        await streams.ensure(js, streams.Layout(replicas=3))
    finally:
        await nc.close()


def ids_on_every_shard(shards: int, per_shard: int) -> list[str]:
    """Workflow ids, `per_shard` of them hashing to each shard."""
    out: dict[int, list[str]] = defaultdict(list)
    while min((len(out[s]) for s in range(shards)), default=0) < per_shard:
        wf = f"cl-{uuid.uuid4().hex[:10]}"
        if len(out[shard_of(wf, shards)]) < per_shard:
            out[shard_of(wf, shards)].append(wf)
    return [wf for s in range(shards) for wf in out[s]]


async def read_status(fm: FlowMesh, wf: str) -> WorkflowStatus | None:
    """The workflow's status, read again while the cluster elects a new leader for the
    bucket (reads time out for a few seconds after a server dies)."""
    for _ in range(30):
        try:
            return await fm.status(wf)
        except nats.errors.Error:
            await asyncio.sleep(0.5)
    return await fm.status(wf)


async def ops_done(fm: FlowMesh, wfs: list[str]) -> int:
    total = 0
    for wf in wfs:
        st = await read_status(fm, wf)
        total += sum(n.done for n in st.nodes.values()) if st else 0
    return total


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_cluster_survives_a_dead_server_and_a_dead_planner_shard(
    nats_cluster: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
    started = time.monotonic()
    await keep_op_history_r3(nats_cluster.url)
    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=nats_cluster.url,
        cas_url="nats:",  # the JetStream object store, R3 like the rest
        workers=2,
        planner_shards=2,
        worker_args=["--plugin", "fm_test_transforms", "--no-models"],
        engine_args=["--dead-after", "2"],
    )
    fabric.start()
    fm: FlowMesh | None = None
    try:
        fm = await connect(fabric, 2)
        inputs: dict[str, list[dict[str, Any]]] = {}
        tenants = ["acme", "globex"]
        ids = iter(ids_on_every_shard(2, 2))
        for tenant in tenants:  # global scope shares work across tenants (and shards)
            for scope in ("global", "workflow"):
                wf = await fm.submit(parse_spec(workflow(tenant, 0, scope)), workflow_id=next(ids))
                inputs[wf] = dataset(tenant, 0)
        wfs = list(inputs)
        up_s = time.monotonic() - started

        # mid-run: some operators done, most not
        deadline = time.monotonic() + 60
        while await ops_done(fm, wfs) < 10:
            assert time.monotonic() < deadline, "no progress before the kills"
            await asyncio.sleep(0.1)
        nats_cluster.kill(0)  # the first URL: where most clients are connected
        shard = fabric.planner_procs[0]
        os.kill(shard.pid, signal.SIGKILL)
        shard.wait()
        killed_at = await ops_done(fm, wfs)

        statuses: dict[str, WorkflowStatus] = {}
        restarted: list[str] = []
        deadline = time.monotonic() + 120
        while len(statuses) < len(wfs):
            assert time.monotonic() < deadline, f"finished {sorted(statuses)} of {wfs}"
            restarted += fabric.supervise()
            for wf in wfs:
                st = await read_status(fm, wf)
                if st is not None and st.state != "running":
                    statuses[wf] = st
            await asyncio.sleep(0.2)
        total_s = time.monotonic() - started

        # --- every workflow complete, with the right results -------------------------
        asked: dict[str, set[str]] = defaultdict(set)  # op key -> workflows using it
        for wf, status in statuses.items():
            assert status.state == "completed", (wf, status.error)
            for node, rows in expected(inputs[wf]).items():
                assert await fm.result(wf, node) == rows, (wf, node)
            for name, node_status in status.nodes.items():
                assert node_status.complete and node_status.failed == 0, (wf, name)
                assert node_status.ops is not None
                for key in await fm.cas.get_manifest(node_status.ops):
                    asked[key].add(wf)

        # --- every operator committed exactly once (as tests/test_faults.py counts) ----
        history: dict[str, list[OpState]] = defaultdict(list)
        kv_subject, kv_stream = f"$KV.{streams.KV_OPS}.>", f"KV_{streams.KV_OPS}"
        for subject, data in await read_stream(fm, kv_subject, kv_stream):
            if data:
                history[subject.split(".", 2)[2]].append(codec.decode(data, OpState))
        lost = [k for k in asked if not history[k] or history[k][-1].state != "done"]
        double = {
            k: [s.state for s in h]
            for k, h in history.items()
            if sum(s.state != "pending" for s in h) != 1 or h[-1].state == "pending"
        }
        commits: dict[str, set[tuple[float, str]]] = defaultdict(set)
        for _, data in await read_stream(fm, subjects.DONE, streams.STREAM_DONE):
            for done in codec.decode(data, DoneBatch).done:
                commits[done.key].add((done.ended_at, done.worker))
        announced_twice = {k: v for k, v in commits.items() if len(v) != 1}
        info = await fm.bus.js.stream_info(streams.STREAM_DONE)
        print(
            f"cluster: {len(wfs)} workflows on 2 shards, {len(asked)} operators; killed "
            f"n0 and planner-0 at {killed_at} ops done; restarted {restarted}; lost="
            f"{len(lost)} double_commits={len(double)} double_announced="
            f"{len(announced_twice)}; fabric up {up_s:.0f}s, all done {total_s:.0f}s"
        )
        assert info.config.num_replicas == 3
        assert "planner-0" in restarted
        assert not lost, lost[:5]
        assert not double, list(double.items())[:5]
        assert not announced_twice, list(announced_twice.items())[:5]
        assert set(history) == set(asked)
    finally:
        if fm is not None:
            await fm.close()
        fabric.stop()
        for log in sorted((tmp_path / "data" / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-20:]))


def test_credentials_reach_every_server_of_a_cluster_url_and_logs_hide_them() -> None:
    creds = Creds(user="fabric", password="s3cret")
    url = url_with_creds("nats://10.0.0.1:4222, nats://10.0.0.2:4223", creds)
    assert url == "nats://fabric:s3cret@10.0.0.1:4222,nats://fabric:s3cret@10.0.0.2:4223"
    assert redact_url(url) == "nats://fabric:***@10.0.0.1:4222,nats://fabric:***@10.0.0.2:4223"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_bad_submission_is_dead_lettered_once_however_many_shards(
    nats_url: str, tmp_path: Path
) -> None:
    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=nats_url,
        cas_url=f"file://{tmp_path / 'data' / 'cas'}",
        workers=0,
        planner_shards=3,
    )
    fabric.start()
    fm = await FlowMesh.connect(nats_url, fabric.cas_url)
    try:
        await fm.bus.js.publish(subjects.SUBMIT, b"not a submission")
        # then one workflow per shard: each shard reads submissions in order, so once
        # every shard has accepted its workflow, each has seen the bad one before it
        ids = {shard_of(wf, 3): wf for wf in (f"after-bad-{i}" for i in range(30))}
        spec = parse_spec(workflow("acme", 0, "workflow"))
        for wf in ids.values():
            await fm.submit(spec, workflow_id=wf)
        deadline = time.monotonic() + 60
        while not all([await fm.status(wf) for wf in ids.values()]):
            assert time.monotonic() < deadline, "a shard did not accept its workflow"
            await asyncio.sleep(0.2)
        info = await fm.bus.js.stream_info(streams.STREAM_DLQ)
        assert info.state.messages == 1
    finally:
        await fm.close()
        fabric.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_object_store_cas_waits_out_a_nats_outage(nats_server: NatsServer) -> None:
    """A blob stored while nats-server is down (or a cluster elects a new leader) is
    stored once it is back: a timeout there is an outage, not a store that refused the
    blob, which would fail the workflow writing it."""
    bus = await Bus.connect(nats_server.url, "cas-outage")
    try:
        cas = await open_cas("nats:", bus.js)
        before = await cas.put_record({"before": True})
        nats_server.kill()
        put = asyncio.create_task(cas.put_record({"during": "the outage"}))
        await asyncio.sleep(3.0)
        assert not put.done()  # waiting for the bus, not failed
        nats_server.start()
        digest = await asyncio.wait_for(put, 60)
        assert await cas.get_record(digest) == {"during": "the outage"}
        assert await cas.get_record(before) == {"before": True}
    finally:
        await bus.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_compare_and_set_conflicts_on_a_replicated_bucket_are_conflicts(
    nats_cluster: NatsCluster,
) -> None:
    """An R3 stream refuses a write racing another on the same key with err_code 10164
    (no sequence in it), not the single server's 10071: still a lost race that the
    caller resolves by reading the entry, never an error that stops a planner's wave."""
    bus = await Bus.connect(nats_cluster.url, "cas-race")
    try:
        for round_ in range(5):
            writes = [(f"race-{round_}", f"writer {i}".encode(), 0) for i in range(8)]
            revisions = await bus.kv_write_many(streams.KV_OPS, writes)
            assert sum(r is not None for r in revisions) == 1, revisions
    finally:
        await bus.close()
