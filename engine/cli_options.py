"""Options and helpers every `flowmesh` subcommand shares (kept apart from cli.py so
subcommand modules can import them without an import cycle)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape

from flowmesh.engine.spec import SpecError
from flowmesh.topics.creds import CredsError
from flowmesh.topics.errors import FlowMeshError, WorkflowFailed
from flowmesh.topics.settings import Settings, SettingsError

T = TypeVar("T")


def _console(stderr: bool) -> Console:
    # not a terminal (a pipe, a file, CI logs): never cut or wrap lines at 80 columns
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 100_000)


console = _console(stderr=True)  # progress, notes and errors
stdout = _console(stderr=False)  # what a command answers: tables, results


def connect_timeout() -> float:
    """Seconds a command waits for NATS before it gives up (settings: connect_timeout)."""
    return float(Settings.load().connect_timeout)


def _env(name: str, default: str) -> Callable[[], str]:
    return lambda: os.environ.get(name, default)


nats_option = click.option(
    "--nats",
    "nats_url",
    default=_env("FLOWMESH_NATS", "nats://127.0.0.1:4222"),
    show_default="$FLOWMESH_NATS or nats://127.0.0.1:4222",
    help="NATS server URL",
)
data_option = click.option(
    "--data-dir",
    default=_env("FLOWMESH_DATA", ".flowmesh"),
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
    default=_env("FLOWMESH_CREDS", ""),
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


def _set_env(name: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    # exported to the environment: every process this one starts (LocalFabric's engine
    # and workers) and every Bus it connects run on the same bus
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value:
            os.environ[name] = value
        return value

    return callback


def bus_options(fn: Callable[..., T]) -> Callable[..., T]:
    """--bus / --kafka: where the streams run (topics/transport.py)."""
    fn = click.option(
        "--kafka",
        default=None,
        expose_value=False,
        callback=_set_env("FLOWMESH_KAFKA"),
        help="Kafka bootstrap servers for --bus kafka (default $FLOWMESH_KAFKA or 127.0.0.1:9092)",
    )(fn)
    return click.option(
        "--bus",
        type=click.Choice(["nats", "kafka"]),
        default=None,
        expose_value=False,
        callback=_set_env("FLOWMESH_BUS"),
        help="the streams' bus (default $FLOWMESH_BUS or nats); KV and CAS stay on NATS",
    )(fn)


scheduler_option = click.option(
    "--scheduler",
    type=click.Choice(["live", "faust"]),
    default=None,
    expose_value=False,
    callback=_set_env("FLOWMESH_SCHEDULER"),
    help="live (default, $FLOWMESH_SCHEDULER) or faust (a faust-streaming agent; "
    "needs --bus kafka and the faust extra)",
)


def _cas(cas_url: str | None, data_dir: Path) -> str:
    """The CAS a fabric command (up, engine, ...) runs with: --cas, $FLOWMESH_CAS, or
    DATA_DIR/cas (absolute)."""
    return cas_url or os.environ.get("FLOWMESH_CAS") or f"file://{data_dir.resolve() / 'cas'}"


def client_cas(cas_url: str | None, data_dir: Path) -> str | None:
    """The CAS a client command was told to use (--cas, --data-dir, or their variables),
    or None: then it uses the one the running fabric recorded (topics/fabric.py), so it
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
