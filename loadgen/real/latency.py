"""`loadgen latency`: how long one record takes per stage of a chain, on an idle fabric.

A workflow of one record through `stages` chained `map` nodes (`bench.hop`, which adds
one to the record's `hop` field, so every stage is new work: no stage is served from
the dedup cache). Each run uses a fresh record. A stage's latency is the time from its
predecessor's commit (the workflow's submission for the first stage) to its own commit,
read from the operators' KV entries (`ended_at`): data-flow triggering, ready publish,
scheduling, assignment, execution, commit.

Ray, on the same machine: the same executor as chained tasks, each stage's latency from
the previous task's result to the next one's.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.loadgen.real.results import Progress, no_progress
from flowmesh.topics import codec, streams
from flowmesh.topics.messages import DatasetSpec, NodeSpec, OpState, WorkflowSpec

HOP = "bench.hop"


@dataclass
class Percentiles:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        ms = sorted(s * 1000.0 for s in seconds)
        if not ms:
            return cls(0, float("nan"), float("nan"), float("nan"))
        p99 = ms[min(len(ms) - 1, max(0, round(0.99 * len(ms)) - 1))]
        return cls(len(ms), statistics.median(ms), p99, ms[-1])


@dataclass
class LatencyResult:
    stages: int
    runs: int
    workers: int
    fabric_stage_s: list[float] = field(default_factory=list)
    fabric_run_s: list[float] = field(default_factory=list)
    ray_stage_s: list[float] = field(default_factory=list)
    fabric_parts_s: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "runs": self.runs,
            "workers": self.workers,
            "fabric_per_stage": asdict(Percentiles.of(self.fabric_stage_s)),
            "fabric_per_run": asdict(Percentiles.of(self.fabric_run_s)),
            "ray_per_stage": asdict(Percentiles.of(self.ray_stage_s)),
            "fabric_stage_parts": {
                k: asdict(Percentiles.of(v)) for k, v in self.fabric_parts_s.items()
            },
        }


def chain_spec(stages: int, nonce: str) -> WorkflowSpec:
    nodes = [
        NodeSpec(name=f"s{i}", op="map", fn=HOP, inputs=[f"s{i - 1}" if i > 1 else "data"])
        for i in range(1, stages + 1)
    ]
    return WorkflowSpec(
        name="latency-chain",
        tenant="bench",
        datasets={"data": DatasetSpec(records=[{"nonce": nonce, "hop": 0}])},
        nodes=nodes,
    )


async def _ended_at(fm: FlowMesh, workflow_id: str, stages: int) -> list[OpState]:
    """Each stage's one operator's committed entry, in stage order."""
    status = await fm.status(workflow_id)
    assert status is not None
    kv = await fm.bus.kv(streams.KV_OPS)
    out = []
    for i in range(1, stages + 1):
        ops = status.nodes[f"s{i}"].ops
        assert ops is not None
        (key,) = await fm.cas.get_manifest(ops)
        entry = await kv.get(key)
        assert entry.value is not None
        out.append(codec.decode(entry.value, OpState))
    return out


async def fabric_chain(
    fab: LocalFabric,
    stages: int,
    runs: int,
    progress: Progress,
    breakdown: dict[str, list[float]] | None = None,
) -> tuple[list[float], list[float]]:
    """(per-stage seconds of every run, seconds per run from submit to completed)."""
    per_stage: list[float] = []
    per_run: list[float] = []
    parts = breakdown if breakdown is not None else {}
    async with await FlowMesh.connect(fab.nats_url, fab.cas_url) as fm:
        deadline = time.monotonic() + 300
        while len(await fm.workers()) < fab.workers:
            if time.monotonic() > deadline or not all(fab.alive().values()):
                raise RuntimeError(f"fabric did not come up; logs in {fab.log_dir}")
            await asyncio.sleep(0.2)
        # one run first, not measured: executors resolved, code paths warm
        for run in range(runs + 1):
            spec = chain_spec(stages, uuid.uuid4().hex)
            t0 = time.perf_counter()
            wf = await fm.submit(spec)
            st = await fm.wait(wf, timeout=120)
            seconds = time.perf_counter() - t0
            if st.state != "completed":
                raise RuntimeError(f"latency chain did not complete: {st.state} {st.error}")
            if run == 0:
                continue
            states = await _ended_at(fm, wf, stages)
            ended = [s.ended_at for s in states]
            starts = [st.submitted_at, *ended[:-1]]
            per_stage.extend(e - s for s, e in zip(starts, ended, strict=True))
            # where a stage's time goes (stages after the first): predecessor's commit
            # -> this one's claim (done message, planner), claim -> executor start
            # (ready chunk, scheduler, assignment, worker fetch), start -> commit
            for prev, cur in itertools.pairwise(states):
                parts.setdefault("commit->claim", []).append(cur.created_at - prev.ended_at)
                parts.setdefault("claim->start", []).append(cur.started_at - cur.created_at)
                parts.setdefault("start->commit", []).append(cur.ended_at - cur.started_at)
            per_run.append(seconds)
            progress("fabric", run, runs)
    return per_stage, per_run


def hop_task(record: dict[str, Any]) -> dict[str, Any]:
    """One stage on Ray: the fabric's own executor for `bench.hop`."""
    from flowmesh.loadgen.real.ray_mode import _executors
    from flowmesh.workers.executors import OpError, OpInput

    ex = _executors()[f"map.{HOP}"]
    (outcome,) = ex.run([OpInput(key="op", params={}, inputs=[[record]])], None)
    if isinstance(outcome, OpError):
        raise RuntimeError(str(outcome))
    return outcome[0]


def ray_chain(stages: int, runs: int, workers: int) -> list[float]:
    import ray

    from flowmesh.loadgen.real.ray_mode import ray_init, warm

    ray_init(workers)
    try:
        task = ray.remote(num_cpus=1)(hop_task)
        ray.get([ray.remote(num_cpus=1)(warm).remote(None) for _ in range(workers)])
        ray.get(task.remote({"hop": 0}))
        out: list[float] = []
        for _ in range(runs):
            record: dict[str, Any] = {"nonce": uuid.uuid4().hex, "hop": 0}
            for _ in range(stages):
                t0 = time.perf_counter()
                record = ray.get(task.remote(record))
                out.append(time.perf_counter() - t0)
            if record["hop"] != stages:
                raise RuntimeError("ray lost a stage")
        return out
    finally:
        ray.shutdown()


async def run_latency(
    stages: int,
    runs: int,
    out_dir: Path,
    workers: int = 2,
    with_ray: bool = True,
    progress: Progress = no_progress,
) -> LatencyResult:
    fab = LocalFabric(
        data_dir=out_dir / "fabric",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        cas_url=f"file://{out_dir / 'fabric' / 'cas'}",
        workers=workers,
        worker_args=["--no-models", "--plugin", "flowmesh.loadgen.real.noop"],
    )
    result = LatencyResult(stages, runs, workers)
    try:
        fab.ensure_nats()
        fab.start_engine()
        for _ in range(workers):
            fab.start_worker()
        result.fabric_stage_s, result.fabric_run_s = await fabric_chain(
            fab, stages, runs, progress, result.fabric_parts_s
        )
    finally:
        fab.stop()
    if with_ray:
        result.ray_stage_s = await asyncio.to_thread(ray_chain, stages, runs, workers)
    return result


def latency_markdown(r: LatencyResult) -> str:
    rows = [
        ("FlowMesh fabric, per stage", Percentiles.of(r.fabric_stage_s)),
        ("FlowMesh fabric, whole chain", Percentiles.of(r.fabric_run_s)),
    ]
    rows += [(f"  fabric {k}", Percentiles.of(v)) for k, v in r.fabric_parts_s.items()]
    if r.ray_stage_s:
        rows.append(("Ray tasks, per stage", Percentiles.of(r.ray_stage_s)))
    lines = [
        f"**{r.stages}-stage chain of one record, {r.runs} runs, {r.workers} workers, idle**",
        "",
        "| path | samples | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {p.n} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | {p.max_ms:.1f} |"
            for name, p in rows
        ),
    ]
    return "\n".join(lines) + "\n"
