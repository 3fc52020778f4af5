"""Prometheus metrics scraped from real engine and worker processes after a run, and
log lines bound to the ids of the work they are about."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowmesh.engine.local import LocalFabric
from flowmesh.topics.messages import Assignment, OpSpec, ReadyOp
from flowmesh.topics.telemetry import logs
from tests.conftest import PLUGINS, REPO, NatsServer, connect
from tests.test_top import spec

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free (engine + workers take consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {n} free ports")


def scrape(port: int) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def metrics_fabric(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalFabric]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
    # what `flowmesh up` does: engine on the port, worker i on port + 1 + i
    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=nats_server.url,
        cas_url=f"file://{tmp_path / 'data' / 'cas'}",
        workers=2,
        worker_args=["--plugin", "fm_test_transforms", "--no-models"],
        engine_args=["--dead-after", "10"],
        metrics_port=free_port_run(3),
    )
    fabric.start()
    try:
        yield fabric
    finally:
        fabric.stop()
        for log in sorted((fabric.log_dir or tmp_path).glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))


@pytest.mark.slow
async def test_metrics_move_with_the_right_labels(metrics_fabric: LocalFabric) -> None:
    fabric = metrics_fabric
    async with await connect(fabric, 2) as fm:
        first = await fm.submit(spec("acme"))
        await fm.wait(first, timeout=120)
        second = await fm.submit(spec("globex"))  # the same work: all 13 reused
        await fm.wait(second, timeout=120)

    port = fabric.metrics_port
    engine: Samples = {}
    for _ in range(100):
        # counters move right after the status the client waited on; gauges are sampled
        # twice a second
        engine = scrape(port)
        if (
            value(engine, "flowmesh_workflows_finished_total", tenant="globex") == 1
            and value(engine, "flowmesh_live_workers") == 2
            and value(engine, "flowmesh_ready_ops") == 0
        ):
            break
        await asyncio.sleep(0.1)
    workers = [scrape(port + 1), scrape(port + 2)]

    # planner: operators created and dedup hits, by kind and tenant
    assert value(engine, "flowmesh_workflows_submitted_total", tenant="acme") == 1
    assert value(engine, "flowmesh_workflows_finished_total", tenant="acme", state="completed") == 1
    assert value(engine, "flowmesh_ops_created_total", kind="map", tenant="acme") == 12
    assert value(engine, "flowmesh_ops_created_total", kind="group", tenant="acme") == 1
    assert value(engine, "flowmesh_ops_created_total", tenant="globex") == 0
    assert value(engine, "flowmesh_dedup_hits_total", kind="map", tenant="globex") == 12
    assert value(engine, "flowmesh_dedup_hits_total", role="reused", tenant="globex") == 13
    assert value(engine, "flowmesh_op_requests_total", role="ran") == 13
    assert value(engine, "flowmesh_workflows_running") == 0
    # scheduler: every operator assigned once, in batches whose sizes add up
    assert value(engine, "flowmesh_assigned_ops_total", kind="map", device_class="cpu") == 12
    batches = value(engine, "flowmesh_scheduler_batch_size_count", kind="map", device_class="cpu")
    assert batches >= 1
    assert value(engine, "flowmesh_scheduler_batch_size_sum", kind="map") == 12
    assert value(engine, "flowmesh_assignments_total", kind="map") == batches
    assert value(engine, "flowmesh_live_workers", device_class="cpu") == 2
    assert value(engine, "flowmesh_ready_ops") == 0

    # workers: latency histograms by kind and class, and $ / energy charged to the
    # tenant whose request ran the work (globex reused it: nothing ran for it)
    def total(name: str, **labels: str) -> float:
        return sum(value(w, name, **labels) for w in workers)

    assert total("flowmesh_worker_op_seconds_count", kind="map", device_class="cpu") == 12
    assert total("flowmesh_worker_op_seconds_count", kind="group", device_class="cpu") == 1
    assert total("flowmesh_worker_op_seconds_sum", kind="map") > 0
    assert total("flowmesh_worker_op_seconds_bucket", kind="map", le="+Inf") == 12
    assert total("flowmesh_worker_batch_size_sum", kind="map", device_class="cpu") == 12
    assert total("flowmesh_worker_ops_total", kind="map", status="done") == 12
    assert total("flowmesh_tenant_cost_usd_total", tenant="acme", device_class="cpu") > 0
    assert total("flowmesh_tenant_energy_joules_total", tenant="acme") > 0
    assert total("flowmesh_tenant_cost_usd_total", tenant="globex") == 0


def test_log_lines_carry_the_batch_ids(capsys: pytest.CaptureFixture[str]) -> None:
    op_spec = OpSpec(
        kind="map",
        executor="map.x",
        version="1",
        fanout="record",
        params={},
        model=None,
        inputs=[],
    )
    batch = Assignment.of(
        "b1",
        "w1",
        [
            ReadyOp(key="k" * 64, spec=op_spec, batch_key="bk", workflow_id="wf-a", tenant="acme"),
            ReadyOp(key="j" * 64, spec=op_spec, batch_key="bk", workflow_id="wf-b", tenant="zed"),
        ],
        0.0,
    )
    logs.configure(json=True)
    try:
        import structlog

        log = structlog.get_logger("test")
        with logs.bound(worker="w1", **logs.assignment_ids(batch)):
            log.info("inside")
        log.info("outside")
    finally:
        logs.configure()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    inside = next(x for x in lines if x["event"] == "inside")
    outside = next(x for x in lines if x["event"] == "outside")
    assert inside["batch"] == "b1" and inside["worker"] == "w1"
    assert inside["tenants"] == ["acme", "zed"]
    assert inside["workflows"] == ["wf-a", "wf-b"]
    assert inside["ops"] == ["k" * 16, "j" * 16]
    assert "batch" not in outside  # unbound when the batch is done


def test_observing_a_batch_at_once_is_observing_each() -> None:
    # a worker observes a batch's operators (one shared latency) as one increment
    from prometheus_client import CollectorRegistry, Histogram

    from flowmesh.workers.metrics import observe_n

    reg = CollectorRegistry()
    one = Histogram("one_s", "", buckets=(0.1, 1.0), registry=reg)
    many = Histogram("many_s", "", buckets=(0.1, 1.0), registry=reg)
    for amount, n in ((0.05, 3), (0.5, 2), (7.0, 4)):
        for _ in range(n):
            one.observe(amount)
        observe_n(many, amount, n)

    def samples(prefix: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.removeprefix(prefix), s.labels.get("le", "")): s.value
            for fam in reg.collect()
            for s in fam.samples
            if s.name.startswith(prefix) and not s.name.endswith("_created")
        }

    assert samples("one_s") == samples("many_s")
    assert samples("many_s")[("_count", "")] == 9
