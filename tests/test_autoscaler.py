"""The autoscaler: its plan (pure), the Kubernetes provider against a stand-in for the
API server's scale endpoint, and the local-process provider on a real fabric."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
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
    fleet_for,
    parse_classes,
    plan,
    soon_ready,
    summarize,
)
from flowmesh.engine.providers.kubernetes import KubernetesProvider
from flowmesh.engine.providers.local import LocalProcessProvider
from flowmesh.engine.scheduler import elastic
from flowmesh.engine.scheduler.fleet import Fleet, LatencyEstimator, load_fleet
from flowmesh.engine.scheduler.groups import group_ready
from flowmesh.engine.scheduler.policy import Policy, PolicyConfig, ReadyItem, WorkerState
from flowmesh.engine.workflow_book import WorkflowBook
from flowmesh.loadgen.sim.replay import dump_trace, live_decisions, load_trace, replay
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.messages import NodeSpec, NodeStatus, WorkflowSpec, WorkflowStatus
from tests.conftest import MakeFabric
from tests.workflows import map_then_count

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "tests" / "data" / "autoscale_trace.json"
# the live run whose decisions are replayed through the simulator (and TRACE's config)
REPLAY_CONFIG = AutoscalerConfig(
    classes=(ClassPolicy("cpu", 0, 3, ops_per_s=1.0, pools=frozenset({"cpu"})),),
    target_backlog_s=1.0,
    startup_s=2.0,
    release="forecast",
    idle_grace_s=3.0,
    tick_s=0.5,
    max_step=100,
)
CHEAP = ClassPolicy("cheap", min_workers=0, max_workers=2, price_per_hour=0.10, ops_per_s=1.0)
FAST = ClassPolicy("fast", min_workers=1, max_workers=8, price_per_hour=2.00, ops_per_s=10.0)


def worker(wid: str, cls: str, outstanding: int = 0, idle_for: float = 0.0) -> WorkerObs:
    return WorkerObs(wid, cls, frozenset({"cpu", "gpu"}), outstanding, idle_for)


def waiting(pool: str, kind: str, n: int, model: str | None = None, gb: float = 0.0) -> Snapshot:
    items = tuple(
        ReadyItem(
            f"{kind}-{i}", f"bk-{kind}-{model}", kind, f"{kind}.x@1", model, gb, 0, "t", "wf", 0.0
        )
        for i in range(n)
    )
    return Snapshot({pool: n}, (), {}, ready={pool: items})


def at(snap: Snapshot, replicas: dict[str, int]) -> Snapshot:
    return replace(snap, replicas=replicas)


def policy_for(config: AutoscalerConfig, fleet: Fleet | None = None) -> Policy:
    fleet = fleet_for(config.classes, fleet)
    return Policy(fleet, PolicyConfig(), LatencyEstimator(fleet))


# --- the plan ------------------------------------------------------------------------


def test_the_pool_grows_with_its_backlog_in_seconds_of_work() -> None:
    config = AutoscalerConfig(classes=(FAST,), target_backlog_s=10.0)
    pol = policy_for(config)
    # 50 ops at 10 ops/s (FAST's speed): 5 s of work, under one worker's 10 s target
    steps = plan(at(waiting("cpu", "map", 50), {"fast": 1}), config, pol)
    assert steps == []
    # 300 ops: 30 s: three workers' worth, one is up
    steps = plan(at(waiting("cpu", "map", 300), {"fast": 1}), config, pol)
    assert [(s.device_class, s.target) for s in steps] == [("fast", 3)]


def test_growth_is_bounded_by_max_workers_and_max_step() -> None:
    config = AutoscalerConfig(classes=(FAST,), target_backlog_s=1.0, max_step=3)
    steps = plan(at(waiting("cpu", "map", 10_000), {"fast": 1}), config, policy_for(config))
    assert [(s.device_class, s.target) for s in steps] == [("fast", 4)]
    config = replace(config, max_step=100)
    steps = plan(at(waiting("cpu", "map", 10_000), {"fast": 1}), config, policy_for(config))
    assert [(s.device_class, s.target) for s in steps] == [("fast", 8)]


def test_a_pool_is_served_only_by_classes_that_run_it() -> None:
    cpu_only = ClassPolicy("cpu", max_workers=4, ops_per_s=1.0, pools=frozenset({"cpu"}))
    gpu = ClassPolicy("gpu", max_workers=4, price_per_hour=1.0, pools=frozenset({"gpu"}))
    config = AutoscalerConfig(classes=(cpu_only, gpu), target_backlog_s=10.0)
    steps = plan(
        at(waiting("gpu", "generate", 5), {"cpu": 0, "gpu": 0}), config, policy_for(config)
    )
    assert [(s.device_class, s.target) for s in steps] == [("gpu", 1)]


def test_the_class_is_the_schedulers_choice_not_the_cheapest_per_operator() -> None:
    """The old rule (cheapest $ per operator first) started an RTX 4090 for every GPU
    backlog; the policy's utility weighs time and energy too, and a model that does not
    fit a class never goes there."""
    fleet = load_fleet(REPO / "configs" / "fleet" / "default.yaml")
    classes = tuple(class_from_fleet(fleet, c, 0, 4) for c in ("h100", "a100", "rtx4090"))
    config = AutoscalerConfig(classes=classes, target_backlog_s=30.0)
    pol = policy_for(config, fleet)

    def usd_per_generate(c: ClassPolicy) -> float:
        m = fleet.classes[c.name].latency["generate"]
        return c.price_per_hour * m.seconds(m.max_batch) / m.max_batch

    # the old rule's pick for this backlog (decoding is cheapest per operator on the 4090)
    assert min(classes, key=usd_per_generate).name == "rtx4090"
    replicas = {c.name: 0 for c in classes}
    big = plan(at(waiting("gpu", "generate", 64, "m40", 40.0), replicas), config, pol)
    assert big and all(s.device_class != "rtx4090" for s in big), big
    # the same choice the scheduler's policy makes for one cold worker of each class
    snap = waiting("gpu", "generate", 64, "m16", 16.0)
    cands = [WorkerState(f"new:{c.name}:0", c.name, 1) for c in classes]
    first = pol.decide_groups(group_ready(snap.ready["gpu"]), cands, 0.0)[0]
    steps = plan(at(snap, replicas), config, pol)
    assert steps[0].device_class == first.device_class


def test_idle_workers_retire_only_after_the_grace_and_never_busy_or_below_min() -> None:
    config = AutoscalerConfig(classes=(CHEAP, FAST), idle_grace_s=30.0)
    pol = policy_for(config)
    workers = (
        worker("c1", "cheap", idle_for=29.0),  # not idle long enough
        worker("c2", "cheap", outstanding=1, idle_for=0.0),  # busy
        worker("f1", "fast", idle_for=100.0),
        worker("f2", "fast", idle_for=300.0),
    )
    snap = Snapshot({}, workers, {"cheap": 2, "fast": 2})
    steps = plan(snap, config, pol)
    # cheap: nothing may go yet; fast: down to its minimum of 1, the longest idle first
    assert [(s.device_class, s.target, s.retire) for s in steps] == [("fast", 1, ("f2",))]
    later = Snapshot({}, (worker("c1", "cheap", idle_for=31.0), *workers[1:]), snap.replicas)
    steps = plan(later, config, pol)
    assert [(s.device_class, s.target, s.retire) for s in steps] == [
        ("cheap", 1, ("c1",)),
        ("fast", 1, ("f2",)),
    ]


def test_forecast_release_keeps_only_the_idle_workers_the_backlog_needs() -> None:
    config = AutoscalerConfig(
        classes=(replace(CHEAP, max_workers=4),),
        release="forecast",
        startup_s=10.0,
        idle_grace_s=300.0,
        target_backlog_s=1000.0,
    )
    pol = policy_for(config)
    idle = tuple(worker(f"c{i}", "cheap", idle_for=float(i + 1)) for i in range(3))
    # nothing waiting: every idle one goes at once, long before the grace
    steps = plan(Snapshot({}, idle, {"cheap": 3}), config, pol)
    assert [(s.target, set(s.retire)) for s in steps] == [(0, {"c0", "c1", "c2"})]
    # 15 ops at 1 op/s: 15 s of work, two workers' worth of a 10 s horizon: the two most
    # recently busy stay
    snap = replace(waiting("cpu", "map", 15), workers=idle, replicas={"cheap": 3})
    steps = plan(snap, config, pol)
    assert [(s.target, s.retire) for s in steps] == [(2, ("c2",))]


def test_forecast_release_keeps_the_warm_minimum_only_while_it_can_be_needed() -> None:
    """min_workers under a forecast release, as the simulator's flowmesh keeps it
    (elastic.warm_minimum): kept while running workflows have work for the class's pools
    or workflows arrive at least once per cold start; released between sparse ones."""
    warm = replace(CHEAP, min_workers=1, pools=frozenset({"gpu"}))
    config = AutoscalerConfig(
        classes=(warm,), release="forecast", startup_s=30.0, idle_grace_s=300.0
    )
    pol = policy_for(config)
    idle = Snapshot({}, (worker("c1", "cheap", idle_for=5.0),), {"cheap": 1})
    # a running workflow's later stage runs in its pool: it stays warm for it
    assert plan(replace(idle, work_pools=frozenset({"gpu"})), config, pol) == []
    # work for another pool only, and one workflow an hour: it goes like any other
    sparse = replace(idle, work_pools=frozenset({"cpu"}), arrivals_per_s=1 / 3600)
    assert [(s.target, s.retire) for s in plan(sparse, config, pol)] == [(0, ("c1",))]
    # a workflow every 20 s, within the 30 s cold start: it stays
    assert plan(replace(idle, arrivals_per_s=1 / 20), config, pol) == []
    # a fixed release keeps min_workers whatever the forecast
    fixed = replace(config, release="fixed")
    assert plan(sparse, fixed, policy_for(fixed)) == []
    # the simulator's rule is the same function
    assert elastic.warm_minimum(1, False, 1 / 3600, 30.0) == 0
    assert elastic.arrival_rate([0.0, 10.0, 20.0], 30.0, 30.0) == pytest.approx(0.1)


def test_a_forecast_release_prewarms_cpu_workers_for_work_soon_ready() -> None:
    """A CPU node after a running one (a scoring stage's `group`, say): its operators
    are not created yet, so nothing waits for a worker, but CPU workers are started for
    them (one per cold start of that work, elastic.prewarm), kept while it is still to
    come, and the simulator's flowmesh policy decides the same."""
    cheap = replace(CHEAP, max_workers=4, pools=frozenset({"cpu"}))
    config = AutoscalerConfig(
        classes=(cheap,), release="forecast", startup_s=10.0, target_backlog_s=1000.0
    )
    pol = policy_for(config)
    # 25 map operators soon ready at 1 op/s: 25 s of work, three 10 s cold starts
    soon = Snapshot({}, (), {"cheap": 0}, soon={"map": 25})
    steps = plan(soon, config, pol)
    assert [(s.device_class, s.target) for s in steps] == [("cheap", 3)]
    assert "25 operators soon ready" in steps[0].reason
    # the pre-warmed workers idle until the work is ready: kept for it, and released
    # once nothing is soon ready any more
    idle = tuple(worker(f"c{i}", "cheap", idle_for=5.0) for i in range(3))
    assert plan(replace(soon, workers=idle, replicas={"cheap": 3}), config, pol) == []
    after = plan(Snapshot({}, idle, {"cheap": 3}), config, pol)
    assert [(s.target, len(s.retire)) for s in after] == [(0, 3)]
    # a fixed release does not pre-warm, nor is a GPU class started ahead of its work
    fixed = replace(config, release="fixed")
    assert plan(soon, fixed, policy_for(fixed)) == []
    gpu = AutoscalerConfig(
        classes=(replace(cheap, pools=frozenset({"gpu"})),), release="forecast", startup_s=10.0
    )
    assert plan(replace(soon, soon={"generate": 25}), gpu, policy_for(gpu)) == []
    # the simulator, replaying these rounds, starts and keeps the same workers
    rounds = [
        (0.0, soon, plan(soon, config, pol), 0),
        (5.0, replace(soon, workers=idle, replicas={"cheap": 3}), [], 0),
        (9.0, replace(soon, workers=idle[:2], replicas={"cheap": 2}, soon={"map": 15}), [], 0),
    ]
    live = [live_decisions(plan(r[1], config, pol, r[0])) for r in rounds]
    assert replay(rounds, [], config, fleet_for(config.classes, None), PolicyConfig()) == live
    assert live[0].added == {"cheap": 3} and live[2].added == {}


def test_a_forecast_release_keeps_idle_workers_for_work_soon_ready() -> None:
    """Between two GPU stages of a workflow nothing waits, but the next stage's operators
    are soon ready: the idle workers that work needs within a cold start are kept, as
    the simulator's forecast release keeps them for its remaining work."""
    gpu = replace(CHEAP, max_workers=4, pools=frozenset({"gpu"}))
    config = AutoscalerConfig(
        classes=(gpu,), release="forecast", startup_s=10.0, idle_grace_s=300.0
    )
    pol = policy_for(config)
    idle = tuple(worker(f"g{i}", "cheap", idle_for=float(i + 1)) for i in range(3))
    between = Snapshot({}, idle, {"cheap": 3})
    # nothing soon: all three go; 15 s of generate soon ready: the two most recently
    # busy (g0, g1) stay for its two 10 s cold starts, and no GPU is started ahead of it
    assert [s.retire for s in plan(between, config, pol)] == [("g2", "g1", "g0")]
    soon = replace(between, soon={"generate": 15})
    assert [(s.target, s.retire) for s in plan(soon, config, pol)] == [(2, ("g2",))]
    rounds = [(0.0, between, [], 0), (1.0, soon, [], 0)]
    live = [live_decisions(plan(r[1], config, pol, r[0])) for r in rounds]
    assert replay(rounds, [], config, fleet_for(config.classes, None), PolicyConfig()) == live


def test_work_soon_ready_is_counted_from_the_workflows_status() -> None:
    """Of each node not complete whose input nodes have all started, the operators not
    created yet: a per-record node as many as its largest input, any other node one."""
    node = lambda op, inputs, **kw: NodeStatus(  # noqa: E731
        spec=NodeSpec(name="n", op=op, inputs=inputs, fn="f" if op == "map" else None), **kw
    )
    st = WorkflowStatus(
        "wf",
        "w",
        "t",
        "running",
        0.0,
        0.0,
        nodes={
            "gen": node("generate", ["prompts"], total=10, done=3),
            "clean": node("map", ["gen"], total=2),  # 8 more to come
            "best": node("group", ["clean"]),  # one, once clean is complete
            "after": node("map", ["best"]),  # best has not started: not soon
            "done": node("map", ["gen"], total=10, done=10, complete=True),
        },
    )
    assert soon_ready(st) == {"map": 8, "group": 1}


def status_of(wf: str, state: str, done: int, at: float) -> WorkflowStatus:
    """A generate -> map workflow: while it runs, its 10 map operators soon ready."""
    nodes = {
        "gen": NodeStatus(
            spec=NodeSpec(name="gen", op="generate", inputs=["prompts"], model="m"),
            total=10,
            done=done,
        ),
        "clean": NodeStatus(spec=NodeSpec(name="clean", op="map", inputs=["gen"], fn="f")),
    }
    return WorkflowStatus(wf, "w", "t", state, at, at, nodes)  # type: ignore[arg-type]


async def scanned(bus: Bus) -> tuple[int, frozenset[str], list[float], Counter[str]]:
    """The book's totals computed from the whole bucket read now (the old per-round
    read)."""
    book = [
        summarize(codec.decode(value, WorkflowStatus))
        for _, value, _ in await bus.kv_items(streams.KV_WF)
    ]
    run = [s for s in book if s.running]
    return (
        len(run),
        frozenset(p for s in run for p in s.pools),
        sorted(s.submitted_at for s in book),
        sum((s.soon for s in run), Counter[str]()),
    )


async def test_the_workflow_book_follows_the_bucket_through_changes_and_a_nats_restart(
    nats_server: Any,
) -> None:
    """The autoscaler's workflows are read whole once, then as they change (creates,
    updates, deletes), and read whole again after the server restarts: each round's
    totals are the bucket's."""
    bus = await Bus.connect(nats_server.url, name="test-book")
    book = WorkflowBook(bus, summarize)

    async def converges() -> None:
        want = await scanned(bus)
        for _ in range(100):
            await book.refresh()
            if book.totals() == want:
                return
            await asyncio.sleep(0.05)
        raise AssertionError((book.totals(), want))

    try:
        kv = await bus.kv(streams.KV_WF)
        for i in range(3):
            await kv.put(f"wf{i}", codec.encode(status_of(f"wf{i}", "running", i, float(i))))
        await kv.put("old", codec.encode(status_of("old", "completed", 10, 0.5)))
        await converges()
        assert book.totals()[0] == 3 and book.totals()[3] == Counter({"map": 30})
        await kv.put("wf0", codec.encode(status_of("wf0", "running", 4, 0.0)))  # progress
        await kv.put("wf1", codec.encode(status_of("wf1", "completed", 10, 1.0)))
        await kv.delete("old")
        await converges()
        assert book.totals()[0] == 2 and book.totals()[3] == Counter({"map": 20})
        nats_server.restart()  # the watcher's consumer dies with it
        for _ in range(100):
            if bus.connected and bus.reconnects:
                break
            await asyncio.sleep(0.1)
        await kv.put("wf3", codec.encode(status_of("wf3", "running", 0, 3.0)))
        await converges()
        assert book.totals()[0] == 3 and len(book.totals()[2]) == 4
    finally:
        await book.close()
        await bus.close()


def test_waiting_work_keeps_idle_workers_of_its_pool() -> None:
    # a worker can look idle while operators wait for it (assigned next round): the
    # backlog of its pools keeps it
    config = AutoscalerConfig(classes=(CHEAP,), idle_grace_s=1.0, target_backlog_s=1000.0)
    snap = at(waiting("cpu", "map", 1), {"cheap": 2})
    snap = replace(snap, workers=(worker("c1", "cheap", idle_for=50.0),))
    assert plan(snap, config, policy_for(config)) == []


def test_an_empty_fabric_with_a_running_workflow_gets_one_worker() -> None:
    config = AutoscalerConfig(classes=(FAST, CHEAP))
    empty = Snapshot({}, (), {"cheap": 0, "fast": 0}, running_workflows=1)
    # FAST's minimum of 1 would do it too: give it none to see the rule itself
    no_min = AutoscalerConfig(classes=(replace(FAST, min_workers=0), CHEAP))
    steps = plan(empty, no_min, policy_for(no_min))
    assert [(s.device_class, s.target) for s in steps] == [("fast", 1)]
    assert "no worker" in steps[0].reason
    # nothing running and nothing waiting: nothing starts (FAST's minimum is up)
    assert plan(Snapshot({}, (), {"cheap": 0, "fast": 1}), config, policy_for(config)) == []


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


def bootstrap(snap: Snapshot) -> bool:
    """A round of the live side's bootstrap rule: workflows run, nothing is keyed and no
    worker is up or starting (the simulator keys operators without workers)."""
    idle_fabric = not snap.workers and not any(snap.replicas.values())
    return bool(snap.running_workflows) and idle_fabric and not any(snap.backlog.values())


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
        # a second of waiting work per worker: one worker (1 op/s until its batches
        # show its speed) is not enough for 40 operators
        target_backlog_s=1.0,
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


@pytest.mark.slow
async def test_a_live_runs_scaling_decisions_are_the_simulators(make_fabric: MakeFabric) -> None:
    """One engine: a real run's rounds (workflows arriving, workers joining, the batch
    times they report) replayed through the simulator's flowmesh policy give the same
    workers added, of the same class, and the same workers released."""
    from flowmesh.engine.client import FlowMesh

    fabric = make_fabric(workers=0)
    provider = LocalProcessProvider(fabric, {"cpu": ["--device-class", "cpu"]})
    config = REPLAY_CONFIG
    bus = await Bus.connect(fabric.nats_url, name="test-autoscaler")
    scaler = Autoscaler(bus, provider, config, record=True)
    stop = asyncio.Event()
    loop = asyncio.create_task(scaler.run(stop))
    try:
        async with await FlowMesh.connect(fabric.nats_url, fabric.cas_url) as fm:

            async def retired() -> None:
                for _ in range(300):
                    if not provider.alive():
                        return
                    await asyncio.sleep(0.1)

            first = await fm.wait(await fm.submit(burst("warm", 4, 0.1)), timeout=180)
            assert first.state == "completed"
            await retired()
            # planned with no worker up: a backlog the pool grows for
            wf = await fm.submit(burst("burst", 40, 0.1))
            assert (await fm.wait(wf, timeout=180)).state == "completed"
            await retired()
    finally:
        stop.set()
        await loop
        await bus.close()
    assert scaler.policy.fleet is not None
    if os.environ.get("FLOWMESH_RECORD_TRACE"):  # refresh tests/data/autoscale_trace.json
        trace = dump_trace(scaler.rounds, scaler.observed)
        Path(os.environ["FLOWMESH_RECORD_TRACE"]).write_text(json.dumps(trace, indent=1))
    # a running workflow with nothing keyed and no worker: the bootstrap rule, live only
    # (the simulator keys operators without workers)
    rounds = [r for r in scaler.rounds if not bootstrap(r[1])]
    sim = replay(rounds, scaler.observed, config, scaler.policy.fleet, scaler.policy_config)
    live = [live_decisions(r[2]) for r in rounds]
    for r, a, b in zip(rounds, sim, live, strict=True):
        assert a == b, (r[0], r[1].workers, r[1].replicas, r[1].backlog, a, b)
    summary = [
        (round(r[0], 1), d)
        for r, d in zip(
            scaler.rounds, map(live_decisions, (r[2] for r in scaler.rounds)), strict=True
        )
        if d.added or d.released
    ]
    assert any(d.added for d in live) and any(d.released for d in live), summary
    assert max(n for d in live for n in d.added.values()) >= 2, live


def test_a_recorded_live_run_replays_to_the_same_decisions() -> None:
    """The recorded rounds of a real run (tests/data/autoscale_trace.json, made by the
    test above with FLOWMESH_RECORD_TRACE set: workflows arriving, workers joining and
    the batch times they reported) decided again by the simulator's flowmesh policy and
    by the live autoscaler's plan: the same workers added, of the same class, and the
    same workers released, round by round. The trace holds a round (2.56 s) where a
    just-started worker is idle while 4 operators wait: live keeps it, and so must the
    simulator (replayed with PolicyConfig's default release, it released it)."""
    rounds, observed = load_trace(json.loads(TRACE.read_text()))
    config = REPLAY_CONFIG
    fleet = fleet_for(config.classes, None)
    # the bootstrap rounds (nothing keyed, no worker) are the live side's only
    rounds = [r for r in rounds if not bootstrap(r[1])]
    sim = replay(rounds, observed, config, fleet, PolicyConfig())
    recorded = [live_decisions(r[2]) for r in rounds]
    assert sim == recorded
    # and the live plan, run again now, makes the decisions it made then
    pol = policy_for(config)
    fed = 0
    again = []
    for now, snap, _steps, n_obs in rounds:
        for obs in observed[fed:n_obs]:
            pol.estimator.observe(*obs)
        fed = max(fed, n_obs)
        again.append(live_decisions(plan(snap, config, pol, now)))
    assert again == recorded
    assert any(d.added for d in recorded) and any(d.released for d in recorded)
