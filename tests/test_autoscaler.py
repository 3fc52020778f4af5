"""The autoscaler: its plan (pure), the Kubernetes provider against a stand-in for the
API server's scale endpoint, and the local-process provider on a real fabric."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.autoscaler import (
    Autoscaler,
    AutoscalerConfig,
    ClassPolicy,
    Snapshot,
    WorkerObs,
    class_from_fleet,
    parse_classes,
    plan,
)
from flowmesh.engine.providers.kubernetes import KubernetesProvider
from flowmesh.engine.providers.local import LocalProcessProvider
from flowmesh.engine.scheduler.fleet import load_fleet
from flowmesh.topics import Bus
from flowmesh.topics.messages import WorkflowSpec
from tests.conftest import MakeFabric
from tests.workflows import map_then_count

REPO = Path(__file__).resolve().parent.parent
CHEAP = ClassPolicy("cheap", min_workers=0, max_workers=2, price_per_hour=0.10, ops_per_s=1.0)
FAST = ClassPolicy("fast", min_workers=1, max_workers=8, price_per_hour=2.00, ops_per_s=10.0)
SPEED = {"cheap": 1.0, "fast": 10.0}  # $/op: cheap 2.8e-5, fast 5.6e-5


def worker(wid: str, cls: str, outstanding: int = 0, idle_for: float = 0.0) -> WorkerObs:
    return WorkerObs(wid, cls, frozenset({"cpu", "gpu"}), outstanding, idle_for)


# --- the plan ------------------------------------------------------------------------


def test_backlog_adds_the_cheapest_class_first_then_spills_over() -> None:
    config = AutoscalerConfig(classes=(CHEAP, FAST), drain_s=10.0)
    # 10 ops in 10 s: one op/s, exactly one cheap worker; the fast one stays at its min
    steps = plan(Snapshot({"cpu": 10}, (), {"cheap": 0, "fast": 1}), config, SPEED)
    assert [(s.device_class, s.target) for s in steps] == [("cheap", 1)]
    # 100 ops: cheap to its max (2 ops/s), the rest (8 ops/s) on top of fast's minimum
    # worker (10 ops/s): fast needs none more
    steps = plan(Snapshot({"cpu": 100}, (), {"cheap": 0, "fast": 1}), config, SPEED)
    assert [(s.device_class, s.target) for s in steps] == [("cheap", 2)]
    # 300 ops: 30 ops/s = 2 cheap + the fast minimum + 2 more fast (ceil(18/10))
    steps = plan(Snapshot({"cpu": 300}, (), {"cheap": 0, "fast": 1}), config, SPEED)
    assert {s.device_class: s.target for s in steps} == {"cheap": 2, "fast": 3}


def test_growth_is_bounded_by_max_workers_and_max_step() -> None:
    config = AutoscalerConfig(classes=(CHEAP, FAST), drain_s=1.0, max_step=3)
    steps = plan(Snapshot({"cpu": 10_000}, (), {"cheap": 0, "fast": 1}), config, SPEED)
    assert {s.device_class: s.target for s in steps} == {"cheap": 2, "fast": 4}


def test_a_pool_is_served_only_by_classes_that_run_it() -> None:
    cpu_only = ClassPolicy("cpu", max_workers=4, ops_per_s=1.0, pools=frozenset({"cpu"}))
    gpu = ClassPolicy("gpu", max_workers=4, price_per_hour=1.0, pools=frozenset({"gpu"}))
    config = AutoscalerConfig(classes=(cpu_only, gpu), drain_s=10.0)
    steps = plan(Snapshot({"gpu": 5}, (), {"cpu": 0, "gpu": 0}), config, {"cpu": 1.0, "gpu": 5.0})
    assert [(s.device_class, s.target) for s in steps] == [("gpu", 1)]


def test_idle_workers_retire_only_after_the_grace_and_never_busy_or_below_min() -> None:
    config = AutoscalerConfig(classes=(CHEAP, FAST), idle_grace_s=30.0)
    workers = (
        worker("c1", "cheap", idle_for=29.0),  # not idle long enough
        worker("c2", "cheap", outstanding=1, idle_for=0.0),  # busy
        worker("f1", "fast", idle_for=100.0),
        worker("f2", "fast", idle_for=300.0),
    )
    snap = Snapshot({}, workers, {"cheap": 2, "fast": 2})
    steps = plan(snap, config, SPEED)
    # cheap: nothing may go yet; fast: down to its minimum of 1, the longest idle first
    assert [(s.device_class, s.target, s.retire) for s in steps] == [("fast", 1, ("f2",))]
    later = Snapshot({}, (worker("c1", "cheap", idle_for=31.0), *workers[1:]), snap.replicas)
    steps = plan(later, config, SPEED)
    assert [(s.device_class, s.target, s.retire) for s in steps] == [
        ("cheap", 1, ("c1",)),
        ("fast", 1, ("f2",)),
    ]


def test_waiting_work_keeps_idle_workers_of_its_pool() -> None:
    # a worker can look idle while operators wait for it (assigned next round): the
    # backlog of its pools keeps it
    config = AutoscalerConfig(classes=(CHEAP,), idle_grace_s=1.0, drain_s=1000.0)
    snap = Snapshot({"cpu": 1}, (worker("c1", "cheap", idle_for=50.0),), {"cheap": 2})
    assert plan(snap, config, SPEED) == []


def test_an_empty_fabric_with_a_running_workflow_gets_one_cheap_worker() -> None:
    config = AutoscalerConfig(classes=(FAST, CHEAP))
    empty = Snapshot({}, (), {"cheap": 0, "fast": 0}, running_workflows=1)
    # FAST's minimum of 1 would do it too: give it none to see the rule itself
    no_min = AutoscalerConfig(classes=(replace(FAST, min_workers=0), CHEAP))
    steps = plan(empty, no_min, SPEED)
    assert [(s.device_class, s.target) for s in steps] == [("cheap", 1)]
    assert "no worker" in steps[0].reason
    # nothing running and nothing waiting: nothing starts
    assert plan(Snapshot({}, (), {"cheap": 0, "fast": 1}), config, SPEED) == []


def test_class_specs_and_fleet_prices() -> None:
    fleet = load_fleet(REPO / "configs" / "fleet" / "default.yaml")
    h100 = class_from_fleet(fleet, "h100", 0, 2)
    assert h100.price_per_hour == fleet.classes["h100"].price_per_hour
    assert "gpu" in h100.pools and h100.ops_per_s > 0
    classes = parse_classes(["h100:1:3", "cpu"], fleet, default_max=5)
    assert [(c.name, c.min_workers, c.max_workers) for c in classes] == [
        ("h100", 1, 3),
        ("cpu", 0, 5),
    ]
    for bad in ("cpu:1", "cpu:x:2", "a.b", "cpu:3:1"):
        with pytest.raises(ValueError):
            parse_classes([bad], fleet, default_max=5)


# --- Kubernetes provider --------------------------------------------------------------


class FakeScaleAPI(BaseHTTPRequestHandler):
    """The Deployment `scale` subresource of an API server, nothing else: a stand-in at
    the seam the test is not about (there is no cluster here). The client under test is
    the official `kubernetes` one, talking HTTP to this."""

    replicas: dict[str, int] = {}
    patches: list[tuple[str, str, Any]] = []

    def _deployment(self) -> tuple[str, str] | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        # apis/apps/v1/namespaces/<ns>/deployments/<name>/scale
        if (
            len(parts) == 8
            and parts[:4] == ["apis", "apps", "v1", "namespaces"]
            and (parts[5], parts[7]) == ("deployments", "scale")
        ):
            return parts[4], parts[6]
        return None

    def _reply(self, ns: str, name: str) -> None:
        n = self.replicas[f"{ns}/{name}"]
        body = json.dumps(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": n},
                "status": {"replicas": n, "selector": f"app={name}"},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        dep = self._deployment()
        if dep is None or f"{dep[0]}/{dep[1]}" not in self.replicas:
            self.send_error(404)
            return
        self._reply(*dep)

    def do_PATCH(self) -> None:
        dep = self._deployment()
        if dep is None or f"{dep[0]}/{dep[1]}" not in self.replicas:
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).patches.append((self.headers["Content-Type"], self.path, body))
        self.replicas[f"{dep[0]}/{dep[1]}"] = int(body["spec"]["replicas"])
        self._reply(*dep)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def scale_api() -> Iterator[str]:
    FakeScaleAPI.replicas = {"fm/flowmesh-worker": 1, "fm/flowmesh-worker-gpu": 0}
    FakeScaleAPI.patches = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeScaleAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_kubernetes_provider_scales_the_deployment(scale_api: str) -> None:
    provider = KubernetesProvider.from_environment(
        "fm", {"cpu": "flowmesh-worker", "h100": "flowmesh-worker-gpu"}, host=scale_api
    )
    assert await provider.replicas("cpu") == 1
    assert await provider.replicas("h100") == 0
    await provider.scale("h100", 3)
    await provider.scale("cpu", 0, retire=["w-1"])
    assert await provider.replicas("h100") == 3
    assert await provider.replicas("cpu") == 0
    assert FakeScaleAPI.replicas == {"fm/flowmesh-worker": 0, "fm/flowmesh-worker-gpu": 3}
    content_type, path, body = FakeScaleAPI.patches[0]
    assert path.startswith("/apis/apps/v1/namespaces/fm/deployments/flowmesh-worker-gpu/scale")
    assert body == {"spec": {"replicas": 3}} and "json" in content_type
    with pytest.raises(ValueError, match="no Deployment"):
        await provider.scale("a100", 1)


# --- local processes on a real fabric -------------------------------------------------


def burst(name: str, n: int, delay: float) -> WorkflowSpec:
    rows = [{"id": i, "text": f"{name} {i}"} for i in range(n)]
    return map_then_count(name, rows, "test.slow_upper", count=None, delay=delay)


@pytest.mark.slow
async def test_backlog_starts_workers_and_idle_ones_stop_without_losing_work(
    make_fabric: MakeFabric,
) -> None:
    fabric = make_fabric(workers=0)
    provider = LocalProcessProvider(fabric, {"cpu": ["--device-class", "cpu"]})
    config = AutoscalerConfig(
        classes=(ClassPolicy("cpu", min_workers=0, max_workers=3, ops_per_s=1.0),),
        # drain the backlog within a second: one worker (about 10 ops/s here) is not enough
        drain_s=1.0,
        idle_grace_s=3.0,
        tick_s=0.5,
    )
    bus = await Bus.connect(fabric.nats_url, name="test-autoscaler")
    scaler = Autoscaler(bus, provider, config)
    stop = asyncio.Event()
    loop = asyncio.create_task(scaler.run(stop))
    from flowmesh.engine.client import FlowMesh

    async def retired(fm: FlowMesh) -> None:
        for _ in range(600):
            if not provider.alive() and not await fm.workers():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"workers still up: {provider.alive()}")

    try:
        async with await FlowMesh.connect(fabric.nats_url, fabric.cas_url) as fm:
            assert await fm.workers() == []  # nothing runs work but the autoscaler
            # an empty fabric: a running workflow and no worker start one (it advertises
            # the executors the planner keys operators with); idle, it stops again
            first = await fm.wait(await fm.submit(burst("warm", 4, 0.1)), timeout=180)
            assert first.state == "completed"
            await retired(fm)
            # now the whole burst is planned with no worker up: a backlog in the ready
            # pool that one worker would not drain in time
            scaler.history.clear()
            wf = await fm.submit(burst("burst", 40, 0.1))
            status = await fm.wait(wf, timeout=180)
            assert status.state == "completed"
            assert [r["text"] for r in await fm.result(wf, "up")] == [
                f"BURST {i}" for i in range(40)
            ]
            ups = [s for s in scaler.history if s.target > s.current]
            assert ups and max(s.target for s in ups) >= 2, scaler.history
            # after the run and the idle grace, every worker retires
            await retired(fm)
        # each one left by its graceful stop, not by a kill
        assert [p.returncode for p in fabric.worker_procs] == [0] * len(fabric.worker_procs)
        assert len(fabric.worker_procs) >= 3  # the warm-up's one and at least two for the burst
    finally:
        stop.set()
        await loop
        await bus.close()
