"""`loadgen large`: one huge workflow and another tenant's small ones on one fabric.

The scenario of issue 13 (a new user's first big job): a ~50 MB jsonl of 92,651 records
through one `map` node on 2 workers, submitted directly (`FlowMesh.submit` with a dataset
path, as `flowmesh submit` does); `--small-after-s` later another tenant submits small
workflows of 2-5 records, one every `--small-every-s`. It reports whether the big one
completed, how long each small one took from its submit call to its end (the target is
p95 <= 5 s), how often a worker was taken for dead (reclaims; every worker lives through
the run, so each is a false death, target 0) or lost its consumer and rejoined, and the
big workflow's progress over time (the longest time without progress shows a stall).

    loadgen large --records 92651
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.spec import parse_spec
from flowmesh.topics.messages import WorkflowSpec

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "omicron",
    "sigma",
    "tau",
    "upsilon",
    "omega",
    "river",
    "mountain",
    "forest",
    "meadow",
    "harbor",
    "lantern",
    "copper",
    "silver",
    "orange",
    "violet",
    "engine",
    "market",
    "garden",
    "window",
    "bridge",
    "signal",
    "planet",
    "rocket",
    "pencil",
    "island",
    "thunder",
]
WORDS_PER_RECORD = 80  # ~560 bytes a record: 92,651 records are ~52 MB of jsonl
BIG_TENANT = "bulk"
SMALL_TENANT = "interactive"
REGISTER_TIMEOUT_S = 300.0

Tick = Callable[[str, int, int], None]
console = Console()


def _no_tick(what: str, done: int, total: int) -> None:
    return None


def write_dataset(path: Path, records: int, seed: int = 13) -> int:
    """A jsonl of `records` text records (deterministic); its size in bytes."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(records):
            text = " ".join(rng.choices(WORDS, k=WORDS_PER_RECORD))
            fh.write(json.dumps({"id": i, "text": text}) + "\n")
    return path.stat().st_size


def map_spec(name: str, tenant: str, dataset: dict[str, Any]) -> WorkflowSpec:
    return parse_spec(
        {
            "name": name,
            "tenant": tenant,
            "datasets": {"src": dataset},
            "nodes": [
                {
                    "name": "up",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "src",
                    "params": {"field": "text"},
                }
            ],
        }
    )


@dataclass
class SmallResult:
    workflow_id: str
    records: int
    submitted_s: float  # after the big submit call started
    state: str
    latency_s: float  # from its submit call to its end


@dataclass
class LargeResult:
    records: int
    dataset_bytes: int
    workers: int
    state: str = "unknown"
    submit_s: float = 0.0  # the big submit call (upload included)
    wall_s: float = 0.0  # big submit call start -> its end
    error: str | None = None
    small: list[SmallResult] = field(default_factory=list)
    reclaims: list[dict[str, Any]] = field(default_factory=list)
    rejoins: int = 0
    workers_alive: bool = True
    progress: list[tuple[float, int, int]] = field(default_factory=list)  # (s, done, total)

    @property
    def latencies(self) -> list[float]:
        return [s.latency_s for s in self.small if s.state == "completed"]

    def p95(self) -> float | None:
        lat = sorted(self.latencies)
        if not lat:
            return None
        return lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]

    def max_stall_s(self) -> float:
        """The longest time the big workflow's done count did not move while running."""
        longest, since, last = 0.0, 0.0, -1
        for t, done, total in self.progress:
            if done != last:
                since, last = t, done
            longest = max(longest, t - since)
            if total and done >= total:
                break  # done: the samples taken while the small workflows go on are not a stall
        return longest

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        return {
            "records": self.records,
            "dataset_mb": round(self.dataset_bytes / 1e6, 1),
            "workers": self.workers,
            "state": self.state,
            "error": self.error,
            "submit_s": round(self.submit_s, 2),
            "wall_s": round(self.wall_s, 1),
            "ops_per_s": round(self.records / self.wall_s, 1) if self.wall_s else None,
            "small_workflows": len(self.small),
            "small_completed": len(lat),
            "small_p50_s": round(statistics.median(lat), 2) if lat else None,
            "small_p95_s": round(p, 2) if (p := self.p95()) is not None else None,
            "small_max_s": round(max(lat), 2) if lat else None,
            "reclaims": len(self.reclaims),
            "rejoins": self.rejoins,
            "workers_alive": self.workers_alive,
            "max_stall_s": round(self.max_stall_s(), 1),
        }


def _events(log: Path, event: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


async def run_large(
    records: int,
    out_dir: Path,
    *,
    workers: int = 2,
    small: int = 5,
    small_after_s: float = 10.0,
    small_every_s: float = 5.0,
    sample_s: float = 2.0,
    timeout_s: float = 3600.0,
    engine_args: list[str] | None = None,
    planner_shards: int = 1,
    tick: Tick = _no_tick,
    seed: int = 13,
) -> LargeResult:
    dataset = out_dir / "large.jsonl"
    size = write_dataset(dataset, records, seed)
    result = LargeResult(records=records, dataset_bytes=size, workers=workers)
    data_dir = out_dir / "fabric"
    fabric = LocalFabric(
        data_dir=data_dir,
        nats_url=f"nats://127.0.0.1:{free_port()}",
        cas_url=f"file://{data_dir / 'cas'}",
        workers=workers,
        worker_args=["--no-models"],
        engine_args=list(engine_args or []),  # the defaults `flowmesh up` runs with
        # as `flowmesh up` runs it: planner shard(s), scheduler and gateway as processes
        # of their own (0: the whole engine in one process)
        planner_shards=planner_shards,
    )
    fabric.start()
    try:
        async with await FlowMesh.connect(fabric.nats_url, fabric.cas_url) as fm:
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while len(await fm.workers()) < workers:
                if time.monotonic() > deadline or not all(fabric.alive().values()):
                    raise RuntimeError(f"workers did not register; logs in {fabric.log_dir}")
                await asyncio.sleep(0.2)
            await _drive(
                fm,
                result,
                dataset,
                small,
                small_after_s,
                small_every_s,
                sample_s,
                timeout_s,
                tick,
                seed,
            )
        result.workers_alive = all(
            ok for name, ok in fabric.alive().items() if name.startswith("worker")
        )
    finally:
        fabric.stop()
    logs = fabric.log_dir or data_dir / "logs"
    result.reclaims = [
        e for log in sorted(logs.glob("*.log")) for e in _events(log, "worker reclaimed")
    ]
    result.rejoins = sum(
        len(_events(log, "assignment consumer gone; rejoining"))
        for log in sorted(logs.glob("worker-*.log"))
    )
    return result


async def _drive(
    fm: FlowMesh,
    result: LargeResult,
    dataset: Path,
    small: int,
    small_after_s: float,
    small_every_s: float,
    sample_s: float,
    timeout_s: float,
    tick: Tick,
    seed: int,
) -> None:
    rng = random.Random(seed + 1)
    t0 = time.time()
    big_id = f"large-{int(t0)}"

    async def sample() -> None:
        while True:
            st = await fm.status(big_id)
            if st is not None:
                done = sum(n.done + n.failed for n in st.nodes.values())
                total = max(result.records, sum(n.total for n in st.nodes.values()))
                result.progress.append((round(time.time() - t0, 1), done, total))
                tick("large", done, total)
            await asyncio.sleep(sample_s)

    async def one_small(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + small_after_s + i * small_every_s - time.time()))
        n = rng.randint(2, 5)
        rows = [{"id": i * 10 + j, "text": f"small {i}.{j} {rng.random()}"} for j in range(n)]
        start = time.time()
        wf = await fm.submit(map_spec(f"small-{i}", SMALL_TENANT, {"records": rows}))
        state: str
        try:
            st = await fm.wait(wf, timeout=timeout_s, raise_on_failure=False)
            state, end = st.state, st.ended_at or time.time()
        except TimeoutError:
            state, end = "timeout", time.time()
        result.small.append(SmallResult(wf, n, start - t0, state, end - start))

    sampler = asyncio.create_task(sample())
    smalls = [asyncio.create_task(one_small(i)) for i in range(small)]
    try:
        spec = map_spec("large", BIG_TENANT, {"path": str(dataset)})
        await fm.submit(spec, big_id)
        result.submit_s = time.time() - t0
        try:
            st = await fm.wait(big_id, timeout=timeout_s, raise_on_failure=False)
            result.state, result.error = st.state, st.error
            result.wall_s = (st.ended_at or time.time()) - t0
        except TimeoutError:
            result.state, result.wall_s = "timeout", time.time() - t0
        await asyncio.gather(*smalls)
    finally:
        for t in [sampler, *smalls]:
            t.cancel()
        await asyncio.gather(sampler, *smalls, return_exceptions=True)
        with contextlib.suppress(Exception):
            last = await fm.status(big_id)
            if last is not None:
                done = sum(n.done + n.failed for n in last.nodes.values())
                result.progress.append((round(time.time() - t0, 1), done, result.records))


def markdown(r: LargeResult) -> str:
    s = r.summary()
    lines = [
        f"# loadgen large: {r.records} records ({s['dataset_mb']} MB) on {r.workers} workers",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| big workflow | {s['state']} in {s['wall_s']} s ({s['ops_per_s']} ops/s) | completes |",
        f"| big submit call (upload) | {s['submit_s']} s | |",
        f"| small workflows completed | {s['small_completed']} / {s['small_workflows']} | all |",
        f"| small latency p50 / p95 / max | {s['small_p50_s']} / {s['small_p95_s']} / "
        f"{s['small_max_s']} s | p95 <= 5 s |",
        f"| worker reclaims (false deaths) | {s['reclaims']} | 0 |",
        f"| consumer rejoins | {s['rejoins']} | |",
        f"| longest time without progress | {s['max_stall_s']} s | |",
        "",
        "Progress (s after submit: done / total):",
        "",
    ]
    step = max(1, len(r.progress) // 20)
    lines += [f"- {t:>7.1f} s: {d} / {n}" for t, d, n in r.progress[::step]]
    if r.small:
        lines += ["", "Small workflows (submitted at s: latency s, state):", ""]
        lines += [
            f"- {x.submitted_s:.1f}: {x.latency_s:.2f} s, {x.state} ({x.records} records)"
            for x in sorted(r.small, key=lambda x: x.submitted_s)
        ]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, r: LargeResult) -> list[Path]:
    doc = {
        "summary": r.summary(),
        "progress": r.progress,
        "small": [asdict(x) for x in r.small],
        "reclaims": r.reclaims,
    }
    js = out_dir / "large.json"
    js.write_text(json.dumps(doc, indent=2))
    md = out_dir / "large.md"
    md.write_text(markdown(r))
    return [js, md]


@click.command("large")
@click.option("--records", type=int, default=92_651, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--small", type=int, default=5, show_default=True, help="small workflows")
@click.option("--small-after-s", type=float, default=10.0, show_default=True)
@click.option("--small-every-s", type=float, default=5.0, show_default=True)
@click.option("--timeout-s", type=float, default=3600.0, show_default=True)
@click.option(
    "--planner-shards",
    type=int,
    default=1,
    show_default=True,
    help="as flowmesh up (0: the whole engine in one process)",
)
@click.option("--out", "out_dir", type=click.Path(), default=None, help="[.flowmesh/large]")
def large_cmd(
    records: int,
    workers: int,
    small: int,
    small_after_s: float,
    small_every_s: float,
    timeout_s: float,
    planner_shards: int,
    out_dir: str | None,
) -> None:
    """One huge map workflow on 2 workers with another tenant's small ones beside it."""
    if records < 1 or workers < 1 or small < 0:
        raise click.BadParameter("--records and --workers at least 1, --small at least 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out_dir) if out_dir else Path(".flowmesh") / "large"
    shutil.rmtree(out / "fabric", ignore_errors=True)  # a stale JetStream store
    out.mkdir(parents=True, exist_ok=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("operators"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("large", total=records)
        r = asyncio.run(
            run_large(
                records,
                out,
                workers=workers,
                small=small,
                small_after_s=small_after_s,
                small_every_s=small_every_s,
                timeout_s=timeout_s,
                planner_shards=planner_shards,
                tick=lambda _, d, t: bar.update(task, completed=d, total=t),
            )
        )
    written = write(out, r)
    console.print(markdown(r))
    console.print(json.dumps(r.summary()))
    console.print("wrote " + ", ".join(str(p) for p in written))
    if r.state != "completed" or len(r.latencies) < small:
        raise click.ClickException("the scenario did not complete; see large.json")
