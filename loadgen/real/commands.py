"""`loadgen run` and `loadgen overhead`: the real-execution benchmarks' commands.

loadgen run --workload configs/workloads/real-8tenants.yaml --modes fabric,isolated,ray
loadgen overhead --ops 20000
loadgen latency --stages 10 --runs 20
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from flowmesh.engine.spec import SpecError
from flowmesh.loadgen.real.results import ModeResult, output_mismatches
from flowmesh.loadgen.real.workload import RealWorkload, load_real_workload

MODES = ("fabric", "isolated-lean", "isolated", "ray")
console = Console()


@contextmanager
def _bar(unit: str) -> Iterator[Progress]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        yield bar


def _env() -> None:
    # workers and Ray tasks never reach for a model hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def run_modes(
    wl: RealWorkload,
    modes: list[str],
    out_dir: Path,
    bar: Progress | None,
    timeout_s: float,
    bus: str = "nats",
) -> list[ModeResult]:
    from flowmesh.loadgen.real.fabric_modes import run_fabric_mode

    tasks: dict[str, TaskID] = {}

    def tick(mode: str, done: int, total: int) -> None:
        if bar is None:
            return
        if mode not in tasks:
            tasks[mode] = bar.add_task(mode, total=total)
        bar.update(tasks[mode], completed=done, total=total)

    results = []
    for mode in modes:
        shutil.rmtree(out_dir / mode, ignore_errors=True)  # a stale JetStream store
        if mode == "ray":
            from flowmesh.loadgen.real.ray_mode import run_ray_mode

            results.append(await run_ray_mode(wl, tick, timeout_s))
        else:
            results.append(await run_fabric_mode(wl, mode, out_dir, tick, timeout_s, bus=bus))
    return results


def write_run(
    out_dir: Path, wl: RealWorkload, results: list[ModeResult], meta: dict[str, object], plots: bool
) -> list[Path]:
    from flowmesh.loadgen.real.report import markdown, run_doc, write_json
    from flowmesh.loadgen.real.report import plots as make_plots

    title = (
        f"{wl.name}: {len(wl.tenants)} tenants, {len(wl.submissions)} workflows x "
        f"{wl.pool.records} records, {wl.pool.overlap:.0%} overlap"
    )
    written = [write_json(out_dir / "results.json", run_doc(title, results, meta))]
    md = out_dir / "results.md"
    md.write_text(markdown(title, results))
    written.append(md)
    if plots:
        written += make_plots(out_dir, title, results)
    return written


@click.command("run")
@click.option("--workload", "workload_path", required=True, type=click.Path(exists=True))
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--out", "out_dir", type=click.Path(), default=None, help="[.flowmesh/real/<name>]")
@click.option("--overlap", type=float, default=None, help="override pool.overlap")
@click.option("--records", type=int, default=None, help="override pool.records")
@click.option("--tenants", type=int, default=None, help="keep only the first N tenants")
@click.option("--workers", type=int, default=None, help="override the worker count")
@click.option("--timeout-s", type=float, default=1800.0, show_default=True, help="per workflow")
@click.option("--no-plots", is_flag=True)
@click.option(
    "--bus",
    type=click.Choice(["nats", "kafka"]),
    default="nats",
    show_default=True,
    help="where the fabric modes' streams run; kafka starts a local tansu broker per fabric "
    "(the kafka extra)",
)
def run_cmd(
    workload_path: str,
    modes: str,
    out_dir: str | None,
    overlap: float | None,
    records: int | None,
    tenants: int | None,
    workers: int | None,
    timeout_s: float,
    no_plots: bool,
    bus: str,
) -> None:
    """Run a workload for real on fabric / isolated-lean / isolated / ray; JSON, Markdown
    and plots. Fails when a workflow's results differ between modes."""
    names = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise click.BadParameter(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")
    try:
        wl = load_real_workload(
            workload_path, overlap=overlap, records=records, tenants=tenants, workers=workers
        )
    except SpecError as exc:
        raise click.ClickException(str(exc)) from exc
    _env()
    out = Path(out_dir) if out_dir else Path(".flowmesh") / "real" / wl.name
    started = time.time()
    with _bar("workflows") as bar:
        results = asyncio.run(run_modes(wl, names, out, bar, timeout_s, bus))
    meta = {
        "workload_file": workload_path,
        "started_at": started,
        "tenants": wl.tenants,
        "workers": wl.workers,
        "model": wl.model,
        "records_per_workflow": wl.pool.records,
        "overlap": wl.pool.overlap,
        "bus": bus,
        "cpu_count": os.cpu_count(),
    }
    written = write_run(out, wl, results, meta, not no_plots)
    console.print((out / "results.md").read_text())
    console.print("wrote " + ", ".join(str(p) for p in written))
    failed = sum(len(r.workflows) - r.completed for r in results)
    differ = output_mismatches(results)
    if differ:
        raise click.ClickException(
            "results differ between modes (greedy decoding must not): " + "; ".join(differ)
        )
    if failed:
        raise click.ClickException(f"{failed} workflow(s) did not complete; see results.json")


@click.command("overhead")
@click.option("--ops", type=int, default=20_000, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--payload-bytes", type=int, default=256, show_default=True, help="raw messages")
@click.option("--no-ray", is_flag=True, help="skip the Ray measurement")
@click.option("--profile", "profile_dir", type=click.Path(), default=None, help="pyinstrument")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="[.flowmesh/overhead]")
@click.option("--no-plots", is_flag=True)
@click.option(
    "--bus",
    type=click.Choice(["nats", "kafka"]),
    default="nats",
    show_default=True,
    help="where the streams run; kafka starts a local tansu broker (the kafka extra) and "
    "compares against raw Kafka produce + consume on it",
)
@click.option(
    "--kv",
    type=click.Choice(["nats", "kafka"]),
    default="nats",
    show_default=True,
    help="where the KV buckets live; kafka (with --bus kafka): a Kafka-only fabric",
)
def overhead_cmd(
    ops: int,
    workers: int,
    payload_bytes: int,
    no_ray: bool,
    profile_dir: str | None,
    out_dir: str | None,
    no_plots: bool,
    bus: str,
    kv: str,
) -> None:
    """No-op operators through the fabric vs the raw bus vs Ray tasks (ops/s)."""
    from flowmesh.loadgen.real.overhead import overhead_markdown, run_overhead
    from flowmesh.loadgen.real.report import bar_plot, write_json

    if ops < 1 or workers < 1:
        raise click.BadParameter("--ops and --workers must be at least 1")
    if kv == "kafka" and bus != "kafka":
        raise click.BadParameter("--kv kafka needs --bus kafka (a Kafka-only fabric)")
    _env()
    out = Path(out_dir) if out_dir else Path(".flowmesh") / "overhead"
    shutil.rmtree(out / "fabric", ignore_errors=True)
    with _bar("steps") as bar:
        task = bar.add_task("overhead", total=None)
        r = asyncio.run(
            run_overhead(
                ops,
                out,
                workers,
                payload_bytes,
                with_ray=not no_ray,
                profile_dir=Path(profile_dir) if profile_dir else None,
                progress=lambda _, d, t: bar.update(task, completed=d, total=t),
                bus=bus,
                kv=kv,
            )
        )
    s = r.summary()
    written = [write_json(out / "overhead.json", s)]
    (out / "overhead.md").write_text(overhead_markdown(r))
    written.append(out / "overhead.md")
    if not no_plots:
        raw = "raw Kafka" if bus == "kafka" else "raw JetStream"
        rates = {raw: s["raw_ops_per_s"], "fabric": s["fabric_ops_per_s"]}
        if r.ray_s is not None:
            rates["ray"] = s["ray_ops_per_s"]
        png = bar_plot(out / "overhead.png", f"{ops} no-op operators", rates, "ops/s")
        written += [png] if png else []
    console.print(overhead_markdown(r))
    console.print(json.dumps({k: v for k, v in s.items() if k.endswith("_per_s")}))
    console.print("wrote " + ", ".join(str(p) for p in written))


@click.command("latency")
@click.option("--stages", type=int, default=10, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="chains, one after another")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--no-ray", is_flag=True, help="skip the Ray measurement")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="[.flowmesh/latency]")
def latency_cmd(stages: int, runs: int, workers: int, no_ray: bool, out_dir: str | None) -> None:
    """Per-stage latency of a one-record chain of map nodes on an idle fabric, and on Ray."""
    from flowmesh.loadgen.real.latency import latency_markdown, run_latency
    from flowmesh.loadgen.real.report import write_json

    if stages < 1 or runs < 1 or workers < 1:
        raise click.BadParameter("--stages, --runs and --workers must be at least 1")
    _env()
    out = Path(out_dir) if out_dir else Path(".flowmesh") / "latency"
    shutil.rmtree(out / "fabric", ignore_errors=True)
    with _bar("chains") as bar:
        task = bar.add_task("latency", total=runs)
        r = asyncio.run(
            run_latency(
                stages,
                runs,
                out,
                workers,
                with_ray=not no_ray,
                progress=lambda _, d, t: bar.update(task, completed=d, total=t),
            )
        )
    written = [write_json(out / "latency.json", r.summary())]
    (out / "latency.md").write_text(latency_markdown(r))
    written.append(out / "latency.md")
    console.print(latency_markdown(r))
    console.print("wrote " + ", ".join(str(p) for p in written))
