"""`flowmesh-worker` / `python -m flowmesh.workers.main`: run one worker process."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click

from flowmesh.topics import Bus
from flowmesh.topics.config.creds import CredsError, resolve_url
from flowmesh.topics.config.settings import Settings, SettingsError
from flowmesh.topics.parent import terminate_when_parent_gone
from flowmesh.topics.store.cas import open_cas
from flowmesh.topics.telemetry import logs
from flowmesh.workers import metrics
from flowmesh.workers.runtime import Worker, WorkerConfig


def with_creds(url: str, creds_path: str) -> str:
    """`url` with the user/password of a credentials file (`flowmesh auth init`); a file
    rather than the URL keeps the password off the command line."""
    try:
        return resolve_url(url, creds_path)
    except CredsError as exc:
        raise click.BadParameter(str(exc)) from exc


async def serve(
    nats_url: str, cas_url: str, config: WorkerConfig, kafka: str = "", kv: str | None = None
) -> None:
    orphaned = terminate_when_parent_gone()  # from the start: connecting may wait long
    bus = await Bus.connect(
        nats_url, name=f"flowmesh-worker-{config.device_class}", kafka=kafka, kv=kv
    )
    cas = await open_cas(cas_url, bus.js)
    worker = Worker(bus, cas, config)
    await worker.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(worker.run_until_stopped())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    await worker.stop()
    await bus.close()
    orphaned.cancel()


def _list_fns(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from flowmesh.workers.fns import fn_table

        click.echo(fn_table(), nl=False)
        ctx.exit()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--list-fns",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_fns,
    help="print the built-in fns (transforms and tools) and their parameters, and exit",
)
@click.option(
    "--nats", "nats_url", default=None, help="NATS server URL [settings: $FLOWMESH_NATS, ...]"
)
@click.option(
    "--bus",
    type=click.Choice(["nats", "kafka"]),
    default=None,
    help="the streams' bus [$FLOWMESH_BUS or nats]; KV stays on NATS unless --kv kafka",
)
@click.option(
    "--kafka", default=None, help="Kafka bootstrap servers for --bus kafka [$FLOWMESH_KAFKA]"
)
@click.option(
    "--kv",
    type=click.Choice(["nats", "kafka"]),
    default=None,
    help="where the KV buckets live [$FLOWMESH_KV or nats]; kafka needs --bus kafka",
)
@click.option(
    "--cas",
    "cas_url",
    default=None,
    help="CAS URL: file:///path, nats: or s3://... [$FLOWMESH_CAS, else DATA_DIR/cas]",
)
@click.option(
    "--creds",
    "creds_path",
    default=None,
    help="fabric credentials file (flowmesh auth init) for a server that requires them "
    "[$FLOWMESH_CREDS]",
)
@click.option(
    "--data-dir",
    default=None,
    help="data directory: models are cached under it, and its cas/ is the CAS unless --cas "
    "says otherwise [$FLOWMESH_DATA or .flowmesh]",
)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="settings file (TOML) [$FLOWMESH_CONFIG, or ./flowmesh.toml]",
)
@click.option(
    "--device-class",
    default="cpu",
    show_default=True,
    help="the class the scheduler prices and places it as (a class of the fleet profile)",
)
@click.option(
    "--price-per-hour", default=0.05, show_default=True, type=float, help="its $ per hour"
)
@click.option("--watts", default=65.0, show_default=True, type=float, help="busy power draw")
@click.option(
    "--memory-gb", default=8.0, show_default=True, type=float, help="device memory for models"
)
@click.option("--slots", default=2, show_default=True, type=int, help="assignments held at once")
@click.option(
    "--model",
    "models",
    multiple=True,
    default=["tiny-llama"],
    show_default=True,
    help="model source: tiny-llama, smollm2-135m, all-minilm-l6-v2, hf:/abs/path, ALIAS=SOURCE",
)
@click.option("--no-models", is_flag=True, help="serve no model (transform-only worker)")
@click.option("--plugin", "plugins", multiple=True, help="module that registers transforms")
@click.option("--id", "worker_id", default=None, help="worker id (default: random)")
@click.option(
    "--generate-backend",
    type=click.Choice(["auto", "hf", "vllm"]),
    default="auto",
    show_default=True,
    help="auto: vLLM when it imports and a GPU is visible, else transformers",
)
@click.option(
    "--metrics-port",
    default=None,
    type=int,
    help="serve Prometheus /metrics on this port, 0: off [$FLOWMESH_WORKER_METRICS_PORT or 0]",
)
def main(
    nats_url: str | None,
    bus: str | None,
    kafka: str | None,
    kv: str | None,
    cas_url: str | None,
    creds_path: str | None,
    data_dir: str | None,
    config_file: str | None,
    device_class: str,
    price_per_hour: float,
    watts: float,
    memory_gb: float,
    slots: int,
    models: tuple[str, ...],
    no_models: bool,
    plugins: tuple[str, ...],
    worker_id: str | None,
    generate_backend: str,
    metrics_port: int | None,
) -> None:
    """Run a FlowMesh worker: executes batches the scheduler assigns to it.

    Settings come from the flags, then the environment, then the settings file."""
    try:
        settings = Settings.load(file=config_file).updated(
            nats=nats_url,
            bus=bus,
            kafka=kafka,
            kv=kv,
            cas=cas_url,
            creds=creds_path,
            data_dir=data_dir,
            worker_metrics_port=metrics_port,
        )
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    logs.configure(level=settings.log_level)
    metrics.serve(settings.worker_metrics_port)
    config = WorkerConfig(
        device_class=device_class,
        price_per_hour=price_per_hour,
        watts=watts,
        memory_gb=memory_gb,
        slots=slots,
        model_dir=settings.models_dir,
        models=[] if no_models else list(models),
        plugins=list(plugins),
        worker_id=worker_id,
        generate_backend=generate_backend,  # type: ignore[arg-type]
    )
    kafka_servers = settings.kafka if settings.bus == "kafka" else ""
    url = with_creds(settings.nats, settings.creds)
    asyncio.run(serve(url, settings.cas_url, config, kafka_servers, settings.kv))


if __name__ == "__main__":
    main()
