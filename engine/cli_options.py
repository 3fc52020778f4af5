"""Options and helpers every `flowmesh` subcommand shares (kept apart from cli.py so
subcommand modules can import them without an import cycle)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape

from flowmesh.engine.spec import SpecError
from flowmesh.topics.bus.transport import BUSES
from flowmesh.topics.config.creds import CredsError
from flowmesh.topics.config.settings import Settings, SettingsError
from flowmesh.topics.errors import FlowMeshError, WorkflowFailed

T = TypeVar("T")


def _console(stderr: bool) -> Console:
    # not a terminal (a pipe, a file, CI logs): never cut or wrap lines at 80 columns
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 100_000)


console = _console(stderr=True)  # progress, notes and errors
stdout = _console(stderr=False)  # what a command answers: tables, results


def connect_timeout() -> float:
    """Seconds a command waits for NATS before it gives up (settings: connect_timeout)."""
    return float(settings().connect_timeout)


def settings() -> Settings:
    """The settings in effect (environment > file > defaults); a bad one is a usage
    error that names where it came from."""
    try:
        return Settings.load()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc


def setting(field: str) -> Callable[[], str]:
    """An option's default: that setting (the flag, when given, wins over it)."""
    return lambda: str(getattr(settings(), field))


nats_option = click.option(
    "--nats",
    "nats_url",
    default=setting("nats"),
    show_default="$FLOWMESH_NATS or nats://127.0.0.1:4222",
    help="NATS server URL",
)
data_option = click.option(
    "--data-dir",
    default=setting("data_dir"),
    type=click.Path(path_type=Path),
    show_default="$FLOWMESH_DATA or .flowmesh",
    help="local data directory",
)
cas_option = click.option(
    "--cas",
    "cas_url",
    default=None,
    help="CAS URL: file:///path, nats: or s3://bucket/prefix?endpoint=host:port "
    "(default $FLOWMESH_CAS or file://DATA_DIR/cas)",
)

models_option = click.option(
    "--model",
    "models",
    multiple=True,
    default=("tiny-llama",),
    show_default=True,
    help="model sources the workers serve (tiny-llama, smollm2-135m, all-minilm-l6-v2, hf:/path)",
)
creds_option = click.option(
    "--creds",
    "creds_path",
    default=setting("creds"),
    show_default="$FLOWMESH_CREDS",
    help="fabric credentials file (flowmesh auth init) for a server that requires them",
)
tenant_creds_option = click.option(
    "--tenant-creds",
    "tenant_creds",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="act as a tenant through the gateway, with its credentials file (auth init)",
)


def _choice(flag: str, choices: tuple[str, ...], help: str) -> Callable[[Any], Any]:
    """An option with a fixed set of values and no default of its own (None: the
    settings and environment say)."""
    return click.option(flag, type=click.Choice(choices), default=None, help=help)


def bus_options(fn: Callable[..., T]) -> Callable[..., T]:
    """--bus / --kafka / --kv: where the streams and the KV buckets live
    (topics/bus/transport.py), passed to the command as `bus`, `kafka` and `kv` (None:
    the settings and environment say); a command hands them on as arguments
    (kafka_servers, kv_store) and to its children as flags, never through the
    environment."""
    fn = _choice(
        "--kv",
        BUSES,
        "where the KV buckets live (default $FLOWMESH_KV or nats); kafka needs --bus kafka: "
        "compacted changelog topics, and no process connects to NATS",
    )(fn)
    fn = click.option(
        "--kafka",
        default=None,
        help="Kafka bootstrap servers for --bus kafka (default $FLOWMESH_KAFKA or 127.0.0.1:9092)",
    )(fn)
    fn = _choice(
        "--bus",
        BUSES,
        "the streams' bus (default $FLOWMESH_BUS or nats); KV stays on NATS unless --kv kafka",
    )(fn)
    return fn


def kafka_servers(bus: str | None, kafka: str | None) -> str:
    """The Kafka servers the streams run on, "" for NATS: the flags over the settings."""
    chosen = settings().updated(bus=bus, kafka=kafka)
    return chosen.kafka if chosen.bus == "kafka" else ""


def kv_store(kv: str | None) -> str:
    """Where the KV buckets live ("nats" or "kafka"): the flag over the settings."""
    return settings().updated(kv=kv).kv


scheduler_option = _choice(
    "--scheduler",
    ("live", "faust"),
    "live (default, $FLOWMESH_SCHEDULER) or faust (a faust-streaming agent; "
    "needs --bus kafka and the faust extra)",
)


def _cas(cas_url: str | None, data_dir: Path) -> str:
    """The CAS a fabric command (up, engine, ...) runs with: --cas, the `cas` setting
    ($FLOWMESH_CAS or the file), or DATA_DIR/cas (absolute)."""
    return settings().updated(cas=cas_url or None, data_dir=str(data_dir)).cas_url


def client_cas(cas_url: str | None, data_dir: Path) -> str | None:
    """The CAS a client command was told to use (--cas, --data-dir, or their variables),
    or None: then it uses the one the running fabric recorded (topics/store/fabric.py), so it
    finds the fabric's data from any folder."""
    ctx = click.get_current_context(silent=True)
    given_dir = None
    if ctx is not None and ctx.get_parameter_source("data_dir") not in (
        None,
        ParameterSource.DEFAULT,
    ):
        given_dir = str(data_dir)
    return Settings.load().updated(cas=cas_url, data_dir=given_dir).chosen_cas


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await coro_fn()

    try:
        return asyncio.run(runner())
    except SpecError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        sys.exit(2)
    except WorkflowFailed as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        sys.exit(1)
    except (FlowMeshError, SettingsError, CredsError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(1)
    except (KeyError, RuntimeError, TimeoutError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(1)
