"""`flowmesh`: run the fabric on one machine, submit workflows, look at them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flowmesh import configs
from flowmesh.engine.cli_options import (
    _cas,
    _run,
    bus_options,
    cas_option,
    client_cas,
    console,
    creds_option,
    data_option,
    models_option,
    nats_option,
    scheduler_option,
    stdout,
    tenant_creds_option,
)
from flowmesh.engine.client import FlowMesh, read_records
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.spec import SpecError, load_spec
from flowmesh.engine.tenant_client import TenantClient
from flowmesh.engine.top import printable
from flowmesh.topics import codec
from flowmesh.topics.config.settings import Settings, SettingsError
from flowmesh.topics.errors import NotFound
from flowmesh.topics.messages import DatasetSpec, WorkflowSpec, WorkflowStatus
from flowmesh.topics.store.cas import records_to_arrow
from flowmesh.topics.telemetry import logs

DEMO = configs.path("workflows", "demo.yaml")
DEMO_MODEL = "smollm2-135m"
DAEMONS = {"engine", "planner", "scheduler", "gateway"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_name="flowmesh-fabric", prog_name="flowmesh", message="%(prog)s %(version)s"
)
@click.option(
    "--log-level", default=None, help="debug, info, warning (default $FLOWMESH_LOG_LEVEL or info)"
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="write this command's log lines to stderr (default: DATA_DIR/logs/cli.log; the "
    "engine and workers log to DATA_DIR/logs/ either way)",
)
@click.pass_context
def main(ctx: click.Context, log_level: str | None, verbose: bool) -> None:
    """FlowMesh: a multi-tenant service fabric for composable LLM workflows."""
    log_file = None
    # the engine's processes log to stderr, which whoever runs them (up, a unit, a pod)
    # collects; a command a person types keeps its output free of log lines
    if not verbose and ctx.invoked_subcommand not in DAEMONS:
        try:
            log_file = Settings.load().log_dir / "cli.log"
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from exc
    logs.configure(level=log_level, file=log_file)


# --- running the fabric ---------------------------------------------------------------


@main.command()
@nats_option
@bus_options
@scheduler_option
@data_option
@cas_option
@click.option("--workers", "n_workers", default=2, show_default=True, help="local worker processes")
@models_option
@creds_option
@click.option(
    "--nats-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="config for the nats-server started here (auth init's nats-server.conf)",
)
@click.option(
    "--metrics-port",
    default=9464,
    show_default=True,
    help="engine's Prometheus /metrics port; worker i serves on the port + 1 + i (0: off)",
)
@click.option("--console-port", default=8470, show_default=True, help="web console (0: off)")
@click.option(
    "--autoscale",
    is_flag=True,
    help="add workers while operators wait, retire idle ones (--workers is then the minimum)",
)
@click.option("--max-workers", default=4, show_default=True, help="with --autoscale: the most")
@click.option(
    "--idle-grace",
    default=30.0,
    show_default=True,
    help="with --autoscale: seconds a worker sits idle before it retires",
)
@click.option(
    "--no-models", is_flag=True, help="workers serve no model (transforms and tools only)"
)
@click.option(
    "--planner-shards",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="planner processes, each planning the workflows that hash to it; the scheduler "
    "and the gateway run in processes of their own (0: the whole engine in one process)",
)
def up(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    n_workers: int,
    models: tuple[str, ...],
    creds_path: str,
    nats_config: Path | None,
    metrics_port: int,
    console_port: int,
    autoscale: bool,
    max_workers: int,
    idle_grace: float,
    no_models: bool,
    planner_shards: int,
    bus: str | None,
    kafka: str | None,
    kv: str | None,
    scheduler: str | None,
) -> None:
    """Run the engine and N local workers (and a nats-server if none is reachable), and
    restart any of them that dies, until Ctrl-C or SIGTERM."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    # set before anything starts: a signal while it starts still stops all of it. SIGHUP
    # too: the children have sessions of their own, so a closed terminal reaches `up` alone
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    fabric = LocalFabric(
        data_dir=data_dir,
        nats_url=nats_url,
        cas_url=_cas(cas_url, data_dir),
        workers=0 if autoscale else n_workers,  # the autoscaler starts its own
        worker_args=(["--no-models"] if no_models else [a for m in models for a in ("--model", m)]),
        creds=Path(creds_path) if creds_path else None,
        nats_config=nats_config,
        metrics_port=metrics_port,
        console_port=console_port,
        planner_shards=planner_shards,
        # to every process it starts as flags (this process's environment is left alone)
        bus=bus,
        kafka=kafka,
        kv=kv,
        scheduler=scheduler,
    )
    with fabric:
        engine = f"{planner_shards} planner shard(s)" if planner_shards else "one engine"
        console.print(
            f"FlowMesh up: nats {nats_url}, CAS {fabric.cas_url}, {engine}, {n_workers} "
            f"workers; logs in {fabric.log_dir}. Ctrl-C to stop."
        )
        if console_port:
            console.print(f"console http://127.0.0.1:{console_port}/  (or: flowmesh top)")
        if metrics_port:
            parts = (
                f"scheduler; planner shards on {metrics_port - 1} down to "
                f"{metrics_port - planner_shards}, gateway {metrics_port - 1 - planner_shards}"
                if planner_shards
                else "engine"
            )
            console.print(
                f"metrics http://127.0.0.1:{metrics_port}/metrics ({parts}), "
                f"ports {metrics_port + 1}.. (workers)"
            )
        scaler = None
        if autoscale:
            from flowmesh.engine.providers.local import LocalAutoscaler

            scaler = LocalAutoscaler(
                fabric, n_workers, max(n_workers, max_workers), idle_grace
            ).start()
            console.print(f"autoscaling {n_workers}..{max(n_workers, max_workers)} workers")
        # the fabric keeps serving while a process is down: its work waits on the bus
        while not stopping.wait(0.5):
            for name in fabric.supervise():
                console.print(f"[yellow]{name} exited; restarted it (see its log)[/yellow]")
        console.print("stopping...")
        if scaler is not None:
            scaler.stop()
    console.print("stopped")


@main.command()
@click.option("--workers", "n_workers", default=2, show_default=True, help="local worker processes")
@click.option(
    "--model",
    "models",
    multiple=True,
    default=(DEMO_MODEL,),
    show_default=True,
    help="model the workers serve: smollm2-135m (SmolLM2-135M-Instruct, real text; "
    "converted once, then cached), tiny-llama (a random-weight tiny Llama: seconds, noise), "
    "all-minilm-l6-v2, hf:/path. The built-in demo workflow generates with the first one",
)
@click.option(
    "--records",
    type=click.IntRange(min=1),
    default=None,
    help="run on the first N records of each dataset only (a quick check)",
)
@click.option(
    "--nats", "nats_url", default=None, help="use this NATS server (default: start a private one)"
)
@data_option
@click.argument("workflow", required=False, type=click.Path(exists=True, path_type=Path))
def demo(
    n_workers: int,
    models: tuple[str, ...],
    records: int | None,
    nats_url: str | None,
    data_dir: Path,
    workflow: Path | None,
) -> None:
    """Start a private fabric, run a demo workflow end to end, print its results, stop."""
    started = time.monotonic()
    run_dir = data_dir
    if nats_url is None:
        nats_url = f"nats://127.0.0.1:{free_port()}"
        run_dir = data_dir / f"demo-{int(time.time())}"
    # nats store and logs per run; the CAS and the workers' model folder are shared by
    # every run, so a model converted once (SmolLM2 from its GGUF) is found the next time
    fabric = LocalFabric(
        data_dir=run_dir,
        nats_url=nats_url,
        cas_url=_cas(None, data_dir),
        # one worker first: it converts and caches a model the first time, and the others
        # then find it in the CAS instead of converting it too
        workers=1,
        worker_args=[
            *(a for m in models for a in ("--model", m)),
            *("--data-dir", str(data_dir.resolve())),
        ],
    )
    try:
        spec = load_spec(workflow or DEMO)
        if workflow is None:
            spec = demo_spec(spec, models[0])
        if records is not None:
            spec = first_records(spec, records)
    except SpecError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(2)
    with fabric:
        console.print(
            f"fabric up in {time.monotonic() - started:.1f}s "
            f"(nats {nats_url}, {n_workers} workers serving {', '.join(models)}, "
            f"data {run_dir})"
        )

        Outcome = tuple[str, WorkflowStatus, dict[str, list[dict[str, Any]]], float, float]

        async def go() -> Outcome:
            async with await FlowMesh.connect(nats_url, fabric.cas_url) as fm:
                t_up = time.monotonic()
                # a first run converts the model (SmolLM2: about a minute), later ones load
                # it from the cache in seconds
                console.print(
                    f"loading {', '.join(models)} (the first run converts a model once and "
                    "caches it: a minute or more; later runs: seconds)"
                )
                await _wait_for_workers(fm, 1, timeout=900)
                for _ in range(n_workers - 1):
                    fabric.start_worker()
                await _wait_for_workers(fm, n_workers)
                ready = time.monotonic() - t_up
                t0 = time.monotonic()
                wf = await fm.submit(spec)
                status = await _wait_with_progress(fm, wf)
                wall = time.monotonic() - t0
                results = {n: await fm.result(wf, n) for n in status.nodes}
                return wf, status, results, ready, wall

        wf, status, results, ready, wall = _run(go)
    _print_status(status)
    names = [n.name for n in spec.nodes]
    for node in names[-2:]:
        # the sink in full, the node before it as a sample
        shown = results[node] if node == names[-1] else results[node][:5]
        console.print(f"[bold]{node}[/bold] ({len(results[node])} records, {len(shown)} shown):")
        for row in shown:
            click.echo(json.dumps(row, ensure_ascii=False))
    n_ops = sum(ns.total for ns in status.nodes.values())
    console.print(
        f"[green]workflow {wf} completed:[/green] {n_ops} operators in {wall:.2f}s from "
        f"submission (workers ready after {ready:.1f}s; {time.monotonic() - started:.1f}s in "
        "all with start-up and shutdown)"
    )


def demo_spec(spec: WorkflowSpec, model: str) -> WorkflowSpec:
    """The built-in demo workflow generating with `model` (what the workers serve)."""
    nodes = []
    for n in spec.nodes:
        if n.model:
            params = n.params
            if model == "tiny-llama":
                # its tokenizer has no chat template
                params = {k: v for k, v in params.items() if k not in ("chat", "system")}
            n = msgspec.structs.replace(n, model=model, params=params)
        nodes.append(n)
    return msgspec.structs.replace(spec, nodes=nodes)


def first_records(spec: WorkflowSpec, n: int) -> WorkflowSpec:
    """`spec` with each dataset cut to its first `n` records."""
    datasets = {}
    for name, ds in spec.datasets.items():
        if ds.digest is not None:
            raise SpecError([f"dataset {name!r}: --records cannot cut a dataset given by digest"])
        rows = ds.records if ds.records is not None else read_records(ds.path or "")
        datasets[name] = DatasetSpec(records=rows[:n])
    return msgspec.structs.replace(spec, datasets=datasets)


async def _wait_for_workers(fm: FlowMesh, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await fm.workers()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {n} workers registered after {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def _wait_with_progress(
    fm: FlowMesh | TenantClient, wf: str, timeout: float | None = None
) -> WorkflowStatus:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ops"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(wf, total=None)

        def update(st: WorkflowStatus) -> None:
            total = sum(n.total for n in st.nodes.values())
            done = sum(n.done for n in st.nodes.values())
            progress.update(
                task, total=max(total, 1), completed=done, description=f"{st.name} [{st.state}]"
            )

        return await fm.wait(wf, timeout=timeout, on_update=update)


# --- client verbs ---------------------------------------------------------------------


@main.command()
@nats_option
@data_option
@cas_option
@click.argument("workflow", type=click.Path(exists=True, path_type=Path))
@click.option("--tenant", default=None, help="override the spec's tenant")
@click.option(
    "--id", "workflow_id", default=None, help="workflow id (resubmitting an id is a no-op)"
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait with a progress bar")
@click.option(
    "--timeout", default=None, type=float, help="with --wait: give up after this many seconds"
)
@tenant_creds_option
def submit(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    workflow: Path,
    tenant: str | None,
    workflow_id: str | None,
    wait: bool,
    timeout: float | None,
    tenant_creds: Path | None,
) -> None:
    """Submit a workflow spec (YAML); print its id."""
    if tenant_creds and tenant:
        raise click.UsageError("--tenant-creds names the tenant; drop --tenant")

    async def go() -> None:
        spec = load_spec(workflow)  # inside _run, so a bad spec gets the exit code 2
        if tenant_creds:
            async with await TenantClient.from_creds(tenant_creds) as tc:
                # the credentials name the tenant, whatever the spec file says
                wf = await tc.submit(msgspec.structs.replace(spec, tenant=tc.tenant), workflow_id)
                click.echo(wf)
                if wait:
                    _print_status(await _wait_with_progress(tc, wf, timeout), console)
            return
        async with await FlowMesh.connect(nats_url, client_cas(cas_url, data_dir)) as fm:
            wf = await fm.submit(spec, workflow_id, tenant=tenant)
            click.echo(wf)
            if wait:
                _print_status(await _wait_with_progress(fm, wf, timeout), console)

    _run(go)


@main.command()
@nats_option
@data_option
@cas_option
@click.argument("workflow_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@tenant_creds_option
def status(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    workflow_id: str | None,
    as_json: bool,
    tenant_creds: Path | None,
) -> None:
    """Show all workflows, or one workflow's nodes."""

    async def go() -> None:
        if tenant_creds:
            await _tenant_status(tenant_creds, workflow_id, as_json)
            return
        async with await FlowMesh.connect(nats_url, client_cas(cas_url, data_dir)) as fm:
            if workflow_id:
                _show_status(await fm.status(workflow_id), workflow_id, as_json)
                return
            sts = await fm.workflows()
            workers = await fm.workers()
            if as_json:
                click.echo(json.dumps([codec.to_builtins(s) for s in sts]))
                return
            table = Table("workflow", "name", "tenant", "state", "ops done", "seconds")
            for s in sts:
                total = sum(n.total for n in s.nodes.values())
                done = sum(n.done for n in s.nodes.values())
                secs = (s.ended_at or time.time()) - s.submitted_at
                # names are tenants' text: a `[/red]` in one is not markup
                table.add_row(
                    s.workflow_id,
                    printable(s.name),
                    s.tenant,
                    s.state,
                    f"{done}/{total}",
                    f"{secs:.1f}",
                )
            stdout.print(table)
            stdout.print(
                f"{len(workers)} workers registered: "
                + ", ".join(f"{w.worker} ({w.device_class})" for w in workers)
            )

    _run(go)


@main.command()
@nats_option
@data_option
@cas_option
@click.argument("workflow_id")
@click.argument("node")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "json", "arrow"]),
    default="jsonl",
    show_default=True,
    help="one JSON record per line, one JSON list, or an Arrow IPC file (needs -o)",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=None, help="write to a file"
)
@tenant_creds_option
def result(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    workflow_id: str,
    node: str,
    fmt: str,
    output: Path | None,
    tenant_creds: Path | None,
) -> None:
    """Print (or save) the records a node produced, in order."""

    async def go() -> list[dict[str, Any]]:
        if tenant_creds:
            async with await TenantClient.from_creds(tenant_creds) as tc:
                return await tc.result(workflow_id, node)
        async with await FlowMesh.connect(nats_url, client_cas(cas_url, data_dir)) as fm:
            return await fm.result(workflow_id, node)

    rows = _run(go)
    if fmt == "arrow":
        data = records_to_arrow(rows)
        if output is None:
            raise click.UsageError("--format arrow needs -o FILE")
        output.write_bytes(data)
        return
    text = (
        json.dumps(rows, ensure_ascii=False, indent=2)
        if fmt == "json"
        else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    if output:
        output.write_text(text)
    else:
        click.echo(text, nl=False)


@main.command()
@nats_option
@data_option
@cas_option
@click.argument("workflow_id")
@tenant_creds_option
def cancel(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    workflow_id: str,
    tenant_creds: Path | None,
) -> None:
    """Cancel a running workflow: nothing more of it starts; it ends `cancelled`."""

    async def go() -> str:
        if tenant_creds:
            async with await TenantClient.from_creds(tenant_creds) as tc:
                return await tc.cancel(workflow_id)
        async with await FlowMesh.connect(nats_url, _cas(cas_url, data_dir)) as fm:
            return await fm.cancel(workflow_id)

    click.echo(f"{workflow_id} {_run(go)}")


def _show_status(st: WorkflowStatus | None, workflow_id: str, as_json: bool) -> None:
    if st is None:
        raise NotFound(f"no workflow {workflow_id!r}")
    if as_json:
        click.echo(codec.encode(st).decode())
    else:
        _print_status(st)


async def _tenant_status(creds: Path, workflow_id: str | None, as_json: bool) -> None:
    """`status` as a tenant: its own workflows only, through the gateway."""
    async with await TenantClient.from_creds(creds) as tc:
        if workflow_id:
            _show_status(await tc.status(workflow_id), workflow_id, as_json)
            return
        summaries = await tc.workflows()
        if as_json:
            click.echo(json.dumps([codec.to_builtins(s) for s in summaries]))
            return
        table = Table("workflow", "name", "state", "ops done", "seconds")
        for s in summaries:
            secs = (s.ended_at or time.time()) - s.submitted_at
            table.add_row(
                s.workflow_id,
                printable(s.name),
                s.state,
                f"{s.ops_done}/{s.ops_total}",
                f"{secs:.1f}",
            )
        stdout.print(table)


def _print_status(st: WorkflowStatus, out: Console = stdout) -> None:
    """The node table (and the failure, if any) on `out`: stdout where the table is what
    the command answers (`status WF`), stderr where it is progress (`submit --wait`)."""
    table = Table(title=printable(f"{st.workflow_id}  {st.name}  tenant={st.tenant}  [{st.state}]"))
    for col in ("node", "ops", "done", "failed", "reused", "outputs", "complete"):
        table.add_column(col)
    for name, ns in st.nodes.items():
        table.add_row(
            printable(name),
            str(ns.total),
            str(ns.done),
            str(ns.failed),
            str(ns.reused),
            str(ns.n_outputs),
            "yes" if ns.complete else "no",
        )
    out.print(table)
    if st.error:
        out.print(f"[red]error:[/red] {escape(st.error)}")
    if st.failure is not None:
        f = st.failure
        out.print(
            escape(
                f"failed operator: node {f.node}, key {f.key}, "
                f"{f.attempts} attempt(s), last on worker {f.worker or '?'}"
            ),
            highlight=False,
            soft_wrap=True,
        )
        if f.traceback:
            out.print(escape(f.traceback.rstrip()), highlight=False, soft_wrap=True)


@main.command("settings")
@click.option("--table", is_flag=True, help="print every variable as the README's Markdown table")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (one JSON object)")
def settings_command(table: bool, as_json: bool) -> None:
    """Show the settings in effect (flags > environment > file > defaults), and where each
    one came from."""
    from flowmesh.topics.config.settings import VARIABLES, settings_table

    if table:
        click.echo(settings_table(), nl=False)
        return
    try:
        current = Settings.load()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    rows = []
    for v in VARIABLES:
        value = getattr(current, v.field)
        source = (
            f"${v.env}"
            if os.environ.get(v.env, "").strip()
            else "file"
            if v.field in current.given
            else "default"
        )
        rows.append({"setting": v.field, "value": str(value), "from": source, "variable": v.env})
    if as_json:
        click.echo(json.dumps(rows))
        return
    out = Table("setting", "value", "from")
    for r in rows:
        out.add_row(r["setting"], r["value"], r["from"])
    stdout.print(out)


def _register_subcommands() -> None:
    # in their own modules so each stays small; registered here so `flowmesh --help`
    # lists them
    from flowmesh.engine.auth import auth_group
    from flowmesh.engine.cache.cli import cache_group
    from flowmesh.engine.cli_procs import COMMANDS
    from flowmesh.engine.cost import cost_command
    from flowmesh.engine.lineage.cli import lineage_command
    from flowmesh.engine.top import top_command

    main.add_command(lineage_command)
    main.add_command(top_command)
    main.add_command(cache_group)
    main.add_command(cost_command)
    main.add_command(auth_group)
    for command in COMMANDS:  # engine, planner, scheduler, gateway
        main.add_command(command)


_register_subcommands()


if __name__ == "__main__":
    main()
