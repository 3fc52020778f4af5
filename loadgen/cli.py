"""`loadgen`: the simulator and its benchmarks::

loadgen sim --workload configs/workloads/rlhf-mix.yaml [--policies ...] [--seed N]
loadgen bench-scheduler [--items 10000 --workers 200]
loadgen bench-sim [--gpus 1000 --operators 1000000]
loadgen run --workload configs/workloads/real-8tenants.yaml [--modes fabric,isolated,ray]
loadgen overhead [--ops 20000]
loadgen large [--records 92651]
loadgen latency [--stages 10 --runs 20]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from rich.table import Table

from flowmesh import configs
from flowmesh.engine.scheduler.fleet import Fleet, load_fleet
from flowmesh.engine.scheduler.policy import PolicyConfig, load_policy_config
from flowmesh.loadgen.real import commands as real_commands
from flowmesh.loadgen.real.large import large_cmd
from flowmesh.loadgen.sim.bound import Floor, floor
from flowmesh.loadgen.sim.metrics import PolicyResult, comparison, ratios, simulate
from flowmesh.loadgen.sim.policies import ALIASES, POLICIES
from flowmesh.loadgen.sim.report import plots, table, write_json
from flowmesh.loadgen.sim.workload import LEVERS, Workload, load_workload

DEFAULT_FLEET = configs.path("fleet", "default.yaml")
DEFAULT_SCHEDULER = configs.path("scheduler", "default.yaml")

console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("workflows"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@click.group()
def main() -> None:
    """FlowMesh load generation: simulator, baselines and benchmarks."""


fleet_option = click.option(
    "--fleet", "fleet_path", default=str(DEFAULT_FLEET), type=click.Path(exists=True)
)
scheduler_config_option = click.option(
    "--scheduler-config",
    "scheduler_path",
    default=str(DEFAULT_SCHEDULER),
    type=click.Path(exists=True),
)


def _workload_options(f: Callable[..., None]) -> Callable[..., None]:
    """The options every simulating command shares (workload, configs, overrides)."""
    for opt in reversed(
        [
            click.option(
                "--workload", "workload_path", required=True, type=click.Path(exists=True)
            ),
            fleet_option,
            scheduler_config_option,
            click.option("--policies", default=",".join(POLICIES), show_default=True),
            click.option("--overlap", type=float, default=None, help="every dataset's overlap"),
            click.option("--idle-release-s", type=float, default=None),
            click.option("--target-backlog-s", type=float, default=None, help="autoscaler"),
            click.option("--max-wait-s", type=float, default=None, help="autoscaler (-1: off)"),
            click.option("--preempt-rate", type=float, default=None, help="kills/worker-hour"),
            click.option(
                "--isolated-per", type=click.Choice(["model", "model-kind"]), default=None
            ),
            click.option(
                "--levers-off",
                default="",
                help=f"flowmesh without these levers (comma-separated: {', '.join(LEVERS)})",
            ),
            click.option(
                "--cpu-runs-gpu-kinds/--no-cpu-runs-gpu-kinds",
                default=None,
                help="may CPU workers take generate/score (as their profile allows)?",
            ),
        ]
    ):
        f = opt(f)
    return f


def _setup(
    opts: dict[str, Any], seed: int | None
) -> tuple[Workload, Fleet, PolicyConfig, list[str]]:
    wl = load_workload(opts["workload_path"]).with_overrides(
        seed=seed,
        overlap=opts["overlap"],
        idle_release_s=opts["idle_release_s"],
        target_backlog_s=opts["target_backlog_s"],
        max_wait_s=opts["max_wait_s"],
        preempt_rate_per_h=opts["preempt_rate"],
        isolated_per=opts["isolated_per"],
        cpu_runs_gpu_kinds=opts["cpu_runs_gpu_kinds"],
        levers_off=_levers(opts["levers_off"]),
    )
    names = [ALIASES.get(p.strip(), p.strip()) for p in opts["policies"].split(",") if p.strip()]
    for n in names:
        if n not in POLICIES:
            raise click.BadParameter(f"unknown policy {n!r}; known: {', '.join(POLICIES)}")
    # baselines first, flowmesh last: it is compared with the strongest of them
    names = list(dict.fromkeys(sorted(names, key=lambda n: POLICIES.index(n), reverse=True)))
    fleet = load_fleet(opts["fleet_path"])
    return wl, fleet, load_policy_config(opts["scheduler_path"]), names


def _levers(spec: str) -> list[str]:
    names = [x.strip() for x in spec.split(",") if x.strip()]
    for n in names:
        if n not in LEVERS:
            raise click.BadParameter(f"unknown lever {n!r}; known: {', '.join(LEVERS)}")
    return names


@main.command()
@_workload_options
@click.option("--seed", type=int, default=None, help="override the workload's seed")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="[.flowmesh/sim/<name>]")
@click.option("--no-plots", is_flag=True)
def sim(seed: int | None, out_dir: str | None, no_plots: bool, **opts: Any) -> None:
    """Simulate a workload under each policy; print one table, write JSON and plots."""
    wl, fleet, config, names = _setup(opts, seed)
    results: list[PolicyResult] = []
    with _progress() as bar:
        for name in names:
            task = bar.add_task(name, total=None)

            def tick(done: int, total: int, task: TaskID = task) -> None:
                bar.update(task, completed=done, total=total)

            results.append(simulate(wl, fleet, config, name, tick))
    title = f"{wl.name} (seed {wl.seed})"
    Console(width=max(console.width, 170)).print(table(title, results))
    out = Path(out_dir) if out_dir else Path(".flowmesh") / "sim" / wl.name
    s = wl.settings
    doc = comparison(
        wl,
        results,
        {
            "workload_file": opts["workload_path"],
            "fleet_file": opts["fleet_path"],
            "scheduler_config": opts["scheduler_path"],
            "settings": {
                "overlap_override": opts["overlap"],
                "idle_release_s": s.idle_release_s,
                "cold_start_s": s.cold_start_s,
                "target_backlog_s": s.target_backlog_s,
                "max_wait_s": s.max_wait_s,
                "min_workers": dict(s.min_workers),
                "preempt_rate_per_h": s.preempt_rate_per_h,
                "isolated": {"gpu": s.isolated.gpu, "cpu": s.isolated.cpu, "per": s.isolated.per},
                "pool": dict(s.fleet),
            },
        },
    )
    write_json(out / "results.json", doc)
    written = [out / "results.json"]
    if not no_plots:
        written += plots(out, title, results)
    for r in results:
        t = r.timing
        extra = (
            f", Policy.decide {t['decide_calls']:.0f} calls, {t['decide_ms_mean']:.2f} ms mean"
            if "decide_calls" in t
            else ""
        )
        console.print(f"[dim]{r.policy}: simulated in {t['wall_s']:.1f} s{extra}[/dim]")
    console.print("wrote " + ", ".join(str(p) for p in written))


@main.command()
@_workload_options
@click.option("--seeds", default="1,2,3,4,5", show_default=True, help="comma-separated")
@click.option(
    "--ablate",
    is_flag=True,
    help="also run flowmesh with each lever off alone; print what each lever gives",
)
def sweep(seeds: str, ablate: bool, **opts: Any) -> None:
    """Every policy over several seeds: flowmesh's ratios against the strongest baseline
    on each metric and against each baseline, mean [min-max] over the seeds; the floor
    the mix allows (loadgen/sim/bound.py); with --ablate, each lever's share."""
    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    wl0, _, _, names = _setup(opts, None)
    if "flowmesh" not in names or len(names) < 2:
        raise click.BadParameter("sweep compares flowmesh with baselines: include both")
    levers = [n for n in LEVERS if n not in wl0.settings.levers.off()] if ablate else []
    per_seed: list[dict[str, PolicyResult]] = []
    ablated: list[dict[str, PolicyResult]] = []
    floors = []
    with _progress() as bar:
        task = bar.add_task("seeds", total=len(seed_list) * (len(names) + len(levers)))
        for seed in seed_list:
            wl, fleet, config, _ = _setup(opts, seed)
            results = {}
            for name in names:
                results[name] = simulate(wl, fleet, config, name)
                bar.advance(task)
            per_seed.append(results)
            off = {}
            for lever in levers:
                wl_off = wl.with_overrides(levers_off=[*wl.settings.levers.off(), lever])
                off[lever] = simulate(wl_off, fleet, config, "flowmesh")
                bar.advance(task)
            ablated.append(off)
            floors.append(floor(wl, fleet, config.ref_model_gb))
    keys = {
        "cost_reduction_x": "cost reduction",
        "energy_reduction_x": "energy reduction",
        "p50_latency_ratio": "p50 ratio",
        "p95_latency_ratio": "p95 ratio",
    }
    rows: dict[str, list[dict[str, Any]]] = {"strongest baseline": []}
    for results in per_seed:
        rows["strongest baseline"].append(ratios(results))
        for b in names:
            if b != "flowmesh":
                rows.setdefault(b, []).append(ratios(results, b))
    t = Table(
        title=f"{wl0.name}: flowmesh against each baseline, seeds {seeds}: mean [min-max]",
        title_justify="left",
    )
    t.add_column("against")
    for label in keys.values():
        t.add_column(label, justify="right")
    t.add_column("strongest by cost (per seed)")
    for against, rs in rows.items():
        cells = []
        for k in keys:
            v = [r["flowmesh"][k] for r in rs]
            cells.append(f"{statistics.mean(v):.2f} [{min(v):.2f}-{max(v):.2f}]")
        who = ",".join(r["against"]["cost_reduction_x"] for r in rs)
        t.add_row(against, *cells, who if against == "strongest baseline" else "")
    Console(width=max(console.width, 140)).print(t)
    base_cost = Table(title="$ cost per policy: mean [min-max]", title_justify="left")
    base_cost.add_column("policy")
    for c in ("$ cost", "energy kWh", "p95 s", "workflows done"):
        base_cost.add_column(c, justify="right")
    for name in names:
        rs2 = [res[name] for res in per_seed]

        def span(v: list[float]) -> str:
            return f"{statistics.mean(v):.2f} [{min(v):.2f}-{max(v):.2f}]"

        base_cost.add_row(
            name,
            span([r.cost_usd for r in rs2]),
            span([r.energy_kwh for r in rs2]),
            span([r.latency_p95_s for r in rs2]),
            f"{sum(r.completed for r in rs2)}/{sum(r.workflows for r in rs2)}",
        )
    Console(width=max(console.width, 140)).print(base_cost)
    Console(width=max(console.width, 140)).print(bound_table(wl0.name, per_seed, floors))
    if levers:
        Console(width=max(console.width, 140)).print(
            ablation_table(wl0.name, per_seed, ablated, levers)
        )


def _span(v: list[float], digits: int = 2) -> str:
    d = digits
    return f"{statistics.mean(v):.{d}f} [{min(v):.{d}f}-{max(v):.{d}f}]"


def bound_table(name: str, per_seed: list[dict[str, PolicyResult]], floors: list[Floor]) -> Table:
    """The floor of the mix against the strongest baseline's cost and energy: the most
    any policy could save (strongest / floor), per seed, mean [min-max]."""
    t = Table(
        title=f"{name}: what the mix allows at best (loadgen/sim/bound.py), mean [min-max]",
        title_justify="left",
    )
    t.add_column("quantity")
    t.add_column("mean [min-max]", justify="right")
    best_cost, best_energy, fm_cost, fm_energy = [], [], [], []
    for results in per_seed:
        base = [r for n, r in results.items() if n != "flowmesh"]
        best_cost.append(min(r.cost_usd for r in base))
        best_energy.append(min(r.energy_kwh for r in base))
        fm_cost.append(results["flowmesh"].cost_usd)
        fm_energy.append(results["flowmesh"].energy_kwh)

    def per(f: Callable[[float, Floor], float], base: list[float]) -> str:
        return _span([f(b, fl) for b, fl in zip(base, floors, strict=True)])

    rows = [
        (
            "unique / requested operators",
            _span([f.unique_ops / max(f.requested_ops, 1) for f in floors]),
        ),
        (
            "floor $: unique work, full batches, cheapest class",
            _span([f.cost_usd for f in floors], 3),
        ),
        ("floor $ on the fastest class", _span([f.fastest_cost_usd for f in floors], 3)),
        ("cheapest baseline $", _span(best_cost, 3)),
        ("flowmesh $", _span(fm_cost, 3)),
        ("max cost x (cheapest baseline / floor)", per(lambda b, f: b / f.cost_usd, best_cost)),
        ("max cost x at the fastest class", per(lambda b, f: b / f.fastest_cost_usd, best_cost)),
        ("flowmesh cost x", _span([b / c for b, c in zip(best_cost, fm_cost, strict=True)])),
        ("floor kWh (busy, most frugal class)", _span([f.energy_kwh for f in floors], 3)),
        ("most frugal baseline kWh", _span(best_energy, 3)),
        ("max energy x", per(lambda b, f: b / f.energy_kwh, best_energy)),
        ("flowmesh energy x", _span([b / e for b, e in zip(best_energy, fm_energy, strict=True)])),
    ]
    for label, cell in rows:
        t.add_row(label, cell)
    return t


def ablation_table(
    name: str,
    per_seed: list[dict[str, PolicyResult]],
    ablated: list[dict[str, PolicyResult]],
    levers: list[str],
) -> Table:
    """Per lever: flowmesh with that lever off against full flowmesh (cost and energy:
    off / full, > 1 is what the lever saves; p95: off / full, > 1 is what it gains in
    latency), and the lever-off run against the strongest baseline."""
    t = Table(
        title=f"{name}: flowmesh with one lever off, against full flowmesh, mean [min-max]",
        title_justify="left",
    )
    for c in (
        "lever off",
        "cost off/full",
        "energy off/full",
        "p95 off/full",
        "cost x vs strongest",
        "p95 vs strongest",
        "ops executed",
        "model loads",
    ):
        t.add_column(c, justify="right" if c != "lever off" else "left")
    full = [r["flowmesh"] for r in per_seed]
    t.add_row(
        "(none: full flowmesh)",
        "1.00",
        "1.00",
        "1.00",
        _span([ratios(r)["flowmesh"]["cost_reduction_x"] for r in per_seed]),
        _span([ratios(r)["flowmesh"]["p95_latency_ratio"] for r in per_seed]),
        f"{statistics.mean(r.ops_executed for r in full):,.0f}",
        f"{statistics.mean(r.model_loads for r in full):,.0f}",
    )
    for lever in levers:
        off = [a[lever] for a in ablated]
        swapped = [{**r, "flowmesh": a[lever]} for r, a in zip(per_seed, ablated, strict=True)]
        t.add_row(
            lever,
            _span([o.cost_usd / f.cost_usd for o, f in zip(off, full, strict=True)]),
            _span([o.energy_kwh / f.energy_kwh for o, f in zip(off, full, strict=True)]),
            _span([o.latency_p95_s / f.latency_p95_s for o, f in zip(off, full, strict=True)]),
            _span([ratios(r)["flowmesh"]["cost_reduction_x"] for r in swapped]),
            _span([ratios(r)["flowmesh"]["p95_latency_ratio"] for r in swapped]),
            f"{statistics.mean(r.ops_executed for r in off):,.0f}",
            f"{statistics.mean(r.model_loads for r in off):,.0f}",
        )
    return t


@main.command("bench-scheduler")
@fleet_option
@scheduler_config_option
@click.option("--items", type=int, default=10_000, show_default=True)
@click.option("--workers", type=int, default=200, show_default=True)
@click.option("--groups", type=int, default=200, show_default=True)
@click.option("--runs", type=int, default=5, show_default=True)
def bench_scheduler_cmd(
    fleet_path: str, scheduler_path: str, items: int, workers: int, groups: int, runs: int
) -> None:
    """Decision latency of one Policy.decide round (median of --runs)."""
    from flowmesh.loadgen.sim.bench import bench_scheduler

    b = bench_scheduler(
        load_fleet(fleet_path), load_policy_config(scheduler_path), items, workers, groups, runs
    )

    def spread(ms: list[float]) -> str:
        return f"median {statistics.median(ms):.1f} ms [{min(ms):.1f}-{max(ms):.1f}]"

    console.print(
        f"Policy.decide: {b.items:,} ready operators in {b.groups} batch keys x "
        f"{b.workers} free workers -> {b.decisions} batches assigned; over {len(b.runs_ms)} "
        f"runs: wall {spread(b.runs_ms)}, process CPU {spread(b.cpu_ms)}; from a flat "
        f"list (grouped in the round): wall {spread(b.flat_ms)}"
    )


@main.command("bench-sim")
@fleet_option
@scheduler_config_option
@click.option("--gpus", type=int, default=1000, show_default=True)
@click.option("--operators", type=int, default=1_000_000, show_default=True)
@click.option("--policy", type=click.Choice(POLICIES), default="flowmesh", show_default=True)
@click.option("--window-s", type=float, default=60.0, show_default=True, help="arrival window")
def bench_sim_cmd(
    fleet_path: str, scheduler_path: str, gpus: int, operators: int, policy: str, window_s: float
) -> None:
    """Simulator wall time on a large fleet and operator count."""
    from flowmesh.loadgen.sim.bench import scale_workload

    wl = scale_workload(gpus, operators, window_s=window_s)
    fleet = load_fleet(fleet_path)
    config = load_policy_config(scheduler_path)
    with _progress() as bar:
        task = bar.add_task(f"{policy} on {gpus} GPUs", total=None)
        r = simulate(wl, fleet, config, policy, lambda d, t: bar.update(task, completed=d, total=t))
    t = r.timing
    console.print(
        f"{wl.name}: {r.workflows} workflows, {r.ops_requested:,} operators requested, "
        f"{r.ops_executed:,} executed in {r.batches:,} batches on a pool of "
        f"{sum(wl.settings.fleet.values()):,} workers ({gpus} GPUs, {r.peak_gpus} allocated "
        f"at peak); "
        f"{t['events']:,.0f} events, {t['rounds']:,.0f} rounds; simulated "
        f"{r.makespan_s / 3600:.2f} h"
    )
    extra = (
        f"; Policy.decide {t['decide_calls']:,.0f} calls, {t['decide_ms_mean']:.2f} ms mean"
        if "decide_calls" in t
        else ""
    )
    console.print(
        f"[bold]simulator wall time: {t['wall_s']:.1f} s[/bold] "
        f"({r.ops_requested / max(t['wall_s'], 1e-9):,.0f} operators/s{extra})"
    )


# real execution on the fabric / isolated / Ray, and the per-operator overhead
# (loadgen/real/commands.py)
main.add_command(real_commands.run_cmd)
main.add_command(real_commands.overhead_cmd)
main.add_command(large_cmd)
main.add_command(real_commands.latency_cmd)


if __name__ == "__main__":
    main()
