"""`fabric` and `isolated`: the workload on real FlowMesh processes.

fabric: one shared fabric (a nats-server, the engine, `workers` worker processes) takes
every tenant's workflows with the default `dedup_scope: global`: identical operators run
once, compatible ones are batched across workflows.

isolated (the published baseline): each tenant gets its own fabric (its own nats-server,
engine and worker processes) and submits with `dedup_scope: workflow`, so nothing is
shared between workflows and no batch mixes two tenants. Every fabric runs concurrently
on the same machine; the workload's workers are split over the tenants (the first ones
get one more), so both modes run the same number of worker processes (a workload with
fewer workers than tenants is refused), and every worker is limited to one compute
thread in both modes (OMP_NUM_THREADS=1, as Ray does for its one-CPU tasks) so the CPU
is shared the same way.

isolated-lean (what a tenant running its own lean pipeline would do): each tenant gets its
own fabric as in isolated, with no worker up front; the fabric's autoscaler (the live one,
engine/autoscaler.py) starts workers while its operators wait, up to the tenant's share
of the workload's workers, and retires them once idle (scale to zero). A worker started
on demand pays its start and model load in CPU-seconds and in the latency of the
workflow that waited for it.

With `bus="kafka"` every fabric's streams run on a Kafka-protocol broker of its own (a
local tansu, as `loadgen overhead --bus kafka` starts), so modes compare the same way on
either bus.

Worker-seconds, $ and J come from each operator's committed KV entry (the batch time its
worker measured around the executor, split across the batch) via engine/cost.py, so
both modes are billed by the same code. Worker CPU-seconds come from the kernel: the
CPU time the worker processes used between the first submission and the last
completion (loadgen/real/cputime.py), which wall-clock batch times on a shared box
overstate for whichever mode runs more processes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
import yaml

from flowmesh import configs
from flowmesh.engine.client import FlowMesh
from flowmesh.engine.cost import cost_report
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.providers.local import LocalAutoscaler
from flowmesh.loadgen.real.cputime import CpuMeter
from flowmesh.loadgen.real.results import ModeResult, Progress, WorkflowResult, no_progress
from flowmesh.loadgen.real.workload import RealWorkload, Submission
from flowmesh.topics.messages import DedupScope

log = structlog.get_logger("flowmesh.loadgen")

DEFAULT_SCHEDULER = configs.path("scheduler", "default.yaml")
REGISTER_TIMEOUT_S = 600.0  # workers build/load their model before they register
LEAN_IDLE_S = 5.0  # isolated-lean: an idle worker retires after this long at the latest
CPU_SAMPLE_S = 0.1  # worker CPU is sampled this often (workers come and go in lean)


@dataclass
class Group:
    """One fabric and the submissions it receives."""

    name: str
    fabric: LocalFabric
    submissions: list[Submission]
    scope: DedupScope
    client: FlowMesh | None = None
    max_workers: int = 0  # isolated-lean: the most its autoscaler starts
    scaler: LocalAutoscaler | None = None
    broker: subprocess.Popen[bytes] | None = None  # its Kafka broker (bus kafka)

    def start(self, bus: str) -> None:
        """Its fabric's processes, and first a broker of its own when its streams run
        on Kafka (the processes are told where by flags, the client by `kafka_servers`)."""
        if bus == "kafka":
            from flowmesh.loadgen.real.kafka_broker import start_tansu

            port = free_port()
            logs = self.fabric.log_dir or self.fabric.data_dir / "logs"
            self.broker = start_tansu(port, logs / "tansu.log")
            self.fabric.bus, self.fabric.kafka = "kafka", f"127.0.0.1:{port}"
        self.fabric.start()

    def stop(self) -> None:
        self.fabric.stop()
        if self.broker is not None:
            self.broker.kill()
            self.broker.wait()


@contextlib.contextmanager
def _one_thread_each() -> Iterator[None]:
    """Spawned workers compute on one thread each, like Ray's one-CPU tasks."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scheduler_config(wl: RealWorkload, out_dir: Path) -> list[str]:
    """The engine's --scheduler-config: the default one with the workload's overrides."""
    if not wl.scheduler:
        return []
    base = yaml.safe_load(DEFAULT_SCHEDULER.read_text()) or {}
    path = out_dir / "scheduler.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**base, **wl.scheduler}))
    return ["--scheduler-config", str(path)]


def _fabric(
    data_dir: Path, workers: int, model: str, extra: list[str], engine: list[str]
) -> LocalFabric:
    return LocalFabric(
        data_dir=data_dir,
        nats_url=f"nats://127.0.0.1:{free_port()}",
        cas_url=f"file://{data_dir / 'cas'}",
        workers=workers,
        worker_args=["--model", model, *extra],
        engine_args=["--dead-after", "10", *engine],  # a busy 2-core box delays heartbeats
    )


def plan_groups(
    wl: RealWorkload, mode: str, out_dir: Path, worker_args: list[str] | None = None
) -> list[Group]:
    extra = list(worker_args or [])
    engine = scheduler_config(wl, out_dir / mode)
    if mode == "fabric":
        fab = _fabric(out_dir / "fabric", wl.workers, wl.model, extra, engine)
        return [Group("fabric", fab, list(wl.submissions), "global")]
    if mode == "isolated":
        n = len(wl.tenants)
        if wl.workers < n:
            raise ValueError(
                f"isolated mode needs a worker per tenant: {wl.workers} workers for {n} "
                "tenants (raise the workload's workers)"
            )
        per, extra_one = divmod(wl.workers, n)
        return [
            Group(
                t,
                _fabric(out_dir / "isolated" / t, per + (i < extra_one), wl.model, extra, engine),
                [s for s in wl.submissions if s.tenant == t],
                "workflow",
            )
            for i, t in enumerate(wl.tenants)
        ]
    if mode == "isolated-lean":
        n = len(wl.tenants)
        if wl.workers < n:
            raise ValueError(
                f"isolated-lean mode needs a worker per tenant: {wl.workers} workers for {n} "
                "tenants (raise the workload's workers)"
            )
        per, extra_one = divmod(wl.workers, n)
        return [
            Group(
                t,
                _fabric(out_dir / "isolated-lean" / t, 0, wl.model, extra, engine),
                [s for s in wl.submissions if s.tenant == t],
                "workflow",
                max_workers=per + (i < extra_one),
            )
            for i, t in enumerate(wl.tenants)
        ]
    raise ValueError(f"not a fabric mode: {mode!r}")


def _lean_scaler(group: Group) -> LocalAutoscaler:
    """Scale to zero: a worker per backlog (the live autoscaler's sizing), retired as
    soon as the backlog no longer needs it and after LEAN_IDLE_S at the latest."""
    scaler = LocalAutoscaler(group.fabric, 0, group.max_workers, LEAN_IDLE_S)
    scaler.config = replace(scaler.config, tick_s=0.5, release="forecast", startup_s=LEAN_IDLE_S)
    return scaler


async def _registered(group: Group, deadline: float) -> FlowMesh:
    fab = group.fabric
    fm = await FlowMesh.connect(fab.nats_url, fab.cas_url, kafka=fab.kafka_servers)
    while len(await fm.workers()) < fab.workers:
        dead = [n for n, ok in fab.alive().items() if not ok]
        if dead or time.monotonic() > deadline:
            await fm.close()
            why = f"{', '.join(dead)} exited" if dead else "workers did not register in time"
            raise RuntimeError(f"{group.name}: {why}; logs in {fab.log_dir}")
        await asyncio.sleep(0.2)
    return fm


async def run_fabric_mode(
    wl: RealWorkload,
    mode: str,
    out_dir: Path,
    progress: Progress = no_progress,
    timeout_s: float = 1800.0,
    worker_args: list[str] | None = None,
    bus: str = "nats",
) -> ModeResult:
    groups = plan_groups(wl, mode, out_dir, worker_args)
    t_setup = time.monotonic()
    try:
        # workers started later (isolated-lean's autoscaler) get one thread too
        with _one_thread_each():
            for g in groups:
                g.start(bus)
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            clients = await asyncio.gather(*(_registered(g, deadline) for g in groups))
            for g, c in zip(groups, clients, strict=True):
                g.client = c
            for g in groups:
                if g.max_workers:
                    g.scaler = _lean_scaler(g).start()
            setup_s = time.monotonic() - t_setup
            return await _drive(wl, mode, groups, setup_s, progress, timeout_s)
    finally:
        for g in groups:
            if g.scaler is not None:
                g.scaler.stop()
            if g.client is not None:
                with contextlib.suppress(Exception):
                    await g.client.close()
            g.stop()


async def output_digest(fm: FlowMesh, sub: Submission) -> str:
    """sha256 over every node's result records, canonical JSON in spec order."""
    h = hashlib.sha256()
    for node in sub.spec.nodes:
        records = await fm.result(sub.workflow_id, node.name)
        h.update(node.name.encode() + b"\0")
        h.update(json.dumps(records, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    return h.hexdigest()


async def _drive(
    wl: RealWorkload,
    mode: str,
    groups: list[Group],
    setup_s: float,
    progress: Progress,
    timeout_s: float,
) -> ModeResult:
    total = len(wl.submissions)
    finished: dict[str, WorkflowResult] = {}
    by_wf = {s.workflow_id: (g, s) for g in groups for s in g.submissions}

    async def one(group: Group, sub: Submission) -> None:
        fm = group.client
        assert fm is not None
        try:
            await fm.submit(sub.scoped(group.scope), sub.workflow_id)
            st = await fm.wait(sub.workflow_id, timeout=timeout_s, raise_on_failure=False)
            latency = (st.ended_at or time.time()) - st.submitted_at
            digest = await output_digest(fm, sub) if st.state == "completed" else ""
            finished[sub.workflow_id] = WorkflowResult(
                sub.workflow_id,
                sub.tenant,
                sub.at_s,
                st.state,
                latency,
                error=st.error,
                output_digest=digest,
            )
        except TimeoutError as exc:
            finished[sub.workflow_id] = WorkflowResult(
                sub.workflow_id, sub.tenant, sub.at_s, "timeout", None, error=str(exc)
            )
        progress(mode, len(finished), total)

    progress(mode, 0, total)

    def pids() -> list[int]:
        return [p.pid for g in groups for p in list(g.fabric.worker_procs)]

    meter = CpuMeter()
    meter.start(pids())
    peak = [0]

    async def sampling() -> None:
        while True:
            peak[0] = max(peak[0], meter.sample(pids()))
            await asyncio.sleep(CPU_SAMPLE_S)

    sampler = asyncio.create_task(sampling())
    t0 = time.monotonic()
    wall0 = time.time()
    tasks = []
    try:
        for sub in wl.submissions:  # sorted by arrival
            await asyncio.sleep(max(0.0, t0 + sub.at_s - time.monotonic()))
            group, _ = by_wf[sub.workflow_id]
            tasks.append(asyncio.create_task(one(group, sub)))
        await asyncio.gather(*tasks)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    makespan = time.monotonic() - t0
    peak[0] = max(peak[0], meter.sample(pids()))
    worker_cpu = meter.total()
    lean = any(g.max_workers for g in groups)

    result = ModeResult(
        mode=mode,
        workers=peak[0] if lean else sum(g.fabric.workers for g in groups),
        workflows=[],
        ops_requested=0,
        ops_executed=0,
        worker_seconds=0.0,
        usd=0.0,
        energy_j=0.0,
        makespan_s=makespan,
        setup_s=setup_s,
        notes=(
            f"{len(groups)} fabric(s), dedup_scope {groups[0].scope}, "
            + (
                f"0..{max(g.max_workers for g in groups)} worker(s) each on demand, "
                f"{peak[0]} at most at once"
                if lean
                else f"{groups[0].fabric.workers} worker(s) each"
            )
        ),
        extra={"started_at": wall0},
        worker_cpu_s=worker_cpu,
    )
    for g in groups:
        assert g.client is not None
        report = await cost_report(g.client.bus)
        result.ops_executed += report.operators
        # the fleet's spend: what the workflows were billed and its overhead
        result.worker_seconds += report.total_device_seconds + report.overhead_device_seconds
        result.overhead_s += report.overhead_device_seconds
        result.usd += report.total_usd + report.overhead_usd
        result.energy_j += report.total_energy_j + report.overhead_energy_j
        for s in g.submissions:
            wr = finished[s.workflow_id]
            bill = report.workflows.get(s.workflow_id)
            if bill is not None:
                result.ops_requested += bill.ops
                wr.device_seconds = bill.device_seconds
                wr.usd = bill.paid_usd
                wr.energy_j = bill.paid_energy_j
    result.workflows = [finished[s.workflow_id] for s in wl.submissions]
    log.info("mode finished", **result.summary())
    return result
