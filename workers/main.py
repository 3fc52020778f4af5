"""`flowmesh-worker` / `python -m flowmesh.workers.main`: run one worker process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import click

from flowmesh.topics import Bus, logs
from flowmesh.topics.cas import open_cas
from flowmesh.topics.creds import CredsError, resolve_url
from flowmesh.workers import metrics
from flowmesh.workers.runtime import Worker, WorkerConfig


def with_creds(url: str, creds_path: str) -> str:
    """`url` with the user/password of a credentials file (`flowmesh auth init`); a file
    rather than the URL keeps the password off the command line."""
    try:
        return resolve_url(url, creds_path)
    except CredsError as exc:
        raise click.BadParameter(str(exc)) from exc


def _use_env(name: str, value: str | None) -> str | None:
    # read by Bus.connect (topics/transport.py), like every other component
    if value:
        os.environ[name] = value
    return value


async def serve(nats_url: str, cas_url: str, config: WorkerConfig) -> None:
    bus = await Bus.connect(nats_url, name=f"flowmesh-worker-{config.device_class}")
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


@click.command()
@click.option(
    "--nats",
    "nats_url",
    default=lambda: os.environ.get("FLOWMESH_NATS", "nats://127.0.0.1:4222"),
    show_default="$FLOWMESH_NATS or nats://127.0.0.1:4222",
)
@click.option(
    "--bus",
    type=click.Choice(["nats", "kafka"]),
    default=None,
    expose_value=False,
    callback=lambda ctx, param, value: _use_env("FLOWMESH_BUS", value),
    help="the streams' bus (default $FLOWMESH_BUS or nats); KV and CAS stay on NATS",
)
@click.option(
    "--kafka",
    default=None,
    expose_value=False,
    callback=lambda ctx, param, value: _use_env("FLOWMESH_KAFKA", value),
    help="Kafka bootstrap servers for --bus kafka (default $FLOWMESH_KAFKA)",
)
@click.option(
    "--cas",
    "cas_url",
    default=lambda: os.environ.get("FLOWMESH_CAS", "file://.flowmesh/cas"),
    show_default="$FLOWMESH_CAS or file://.flowmesh/cas",
)
@click.option(
    "--creds",
    "creds_path",
    default=lambda: os.environ.get("FLOWMESH_CREDS", ""),
    show_default="$FLOWMESH_CREDS",
    help="fabric credentials file (flowmesh auth init) for a server that requires them",
)
@click.option(
    "--data-dir",
    default=lambda: os.environ.get("FLOWMESH_DATA", ".flowmesh"),
    type=click.Path(path_type=Path),
)
@click.option("--device-class", default="cpu", show_default=True)
@click.option("--price-per-hour", default=0.05, show_default=True, type=float)
@click.option("--watts", default=65.0, show_default=True, type=float, help="busy power draw")
@click.option("--memory-gb", default=8.0, show_default=True, type=float)
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
    default=lambda: int(os.environ.get("FLOWMESH_WORKER_METRICS_PORT", "0")),
    type=int,
    show_default="$FLOWMESH_WORKER_METRICS_PORT or 0 (off)",
    help="serve Prometheus /metrics on this port (0: off)",
)
def main(
    nats_url: str,
    cas_url: str,
    creds_path: str,
    data_dir: Path,
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
    metrics_port: int,
) -> None:
    """Run a FlowMesh worker: executes batches the scheduler assigns to it."""
    logs.configure()
    metrics.serve(metrics_port)
    config = WorkerConfig(
        device_class=device_class,
        price_per_hour=price_per_hour,
        watts=watts,
        memory_gb=memory_gb,
        slots=slots,
        model_dir=data_dir / "models",
        models=[] if no_models else list(models),
        plugins=list(plugins),
        worker_id=worker_id,
        generate_backend=generate_backend,  # type: ignore[arg-type]
    )
    asyncio.run(serve(with_creds(nats_url, creds_path), cas_url, config))


if __name__ == "__main__":
    main()
