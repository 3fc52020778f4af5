"""`flowmesh engine | planner | scheduler | gateway`: the engine's processes in the
foreground. `engine` runs every part in one process; the others run one part each, the
way `flowmesh up` and deploy/ run them (engine/service.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from flowmesh import configs
from flowmesh.engine.cli_options import (
    _cas,
    bus_options,
    cas_option,
    creds_option,
    data_option,
    nats_option,
    scheduler_option,
)
from flowmesh.engine.service import ALL, GATEWAY, SCHEDULER, Parts, planner_part

F = TypeVar("F", bound=Callable[..., Any])

FLEET = configs.path("fleet", "default.yaml")
POLICY = configs.path("scheduler", "default.yaml")


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


_common = _stack(
    nats_option,
    bus_options,
    data_option,
    cas_option,
    creds_option,
    click.option(
        "--metrics-port",
        default=lambda: int(os.environ.get("FLOWMESH_METRICS_PORT", "0")),
        type=int,
        show_default="$FLOWMESH_METRICS_PORT or 0 (off)",
        help="serve Prometheus /metrics on this port (0: off)",
    ),
)

_scheduling = _stack(
    scheduler_option,
    click.option(
        "--dead-after",
        default=5.0,
        show_default=True,
        help="seconds without a heartbeat before a worker's work is reclaimed",
    ),
    click.option(
        "--fleet",
        "fleet_path",
        type=click.Path(exists=True, path_type=Path),
        default=lambda: str(FLEET) if FLEET.exists() else None,
        help="fleet profile: device classes, prices, power, latency models",
    ),
    click.option(
        "--scheduler-config",
        "policy_path",
        type=click.Path(exists=True, path_type=Path),
        default=lambda: str(POLICY) if POLICY.exists() else None,
        help="utility weights, fair-share tenants, linger",
    ),
)

_console = click.option(
    "--console-port",
    default=lambda: int(os.environ.get("FLOWMESH_CONSOLE_PORT", "0")),
    type=int,
    show_default="$FLOWMESH_CONSOLE_PORT or 0 (off)",
    help="serve the web console on this port (0: off)",
)


def _serve(
    parts: Parts,
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    creds_path: str,
    metrics_port: int,
    dead_after: float = 5.0,
    fleet_path: Path | None = None,
    policy_path: Path | None = None,
    console_port: int = 0,
) -> None:
    from flowmesh.engine.service import serve
    from flowmesh.topics.creds import CredsError, resolve_url

    try:
        url = resolve_url(nats_url, creds_path)
    except CredsError as exc:
        raise click.UsageError(str(exc)) from exc
    asyncio.run(
        serve(
            url,
            _cas(cas_url, data_dir),
            dead_after,
            fleet_path,
            policy_path,
            metrics_port=metrics_port,
            console_port=console_port,
            parts=parts,
        )
    )


@click.command("engine")
@_common
@_scheduling
@_console
def engine_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    creds_path: str,
    metrics_port: int,
    dead_after: float,
    fleet_path: Path | None,
    policy_path: Path | None,
    console_port: int,
) -> None:
    """Run the whole engine (planner + scheduler + tenant gateway) in one process."""
    _serve(
        ALL,
        nats_url,
        data_dir,
        cas_url,
        creds_path,
        metrics_port,
        dead_after,
        fleet_path,
        policy_path,
        console_port,
    )


def _shard_default() -> int:
    return int(os.environ.get("FLOWMESH_PLANNER_SHARD", "0"))


@click.command("planner")
@_common
@click.option(
    "--shard",
    type=int,
    default=_shard_default,
    show_default="$FLOWMESH_PLANNER_SHARD or 0",
    help="this planner's shard, 0..SHARDS-1 (deploy/: the StatefulSet pod's ordinal)",
)
@click.option(
    "--shards",
    type=int,
    default=lambda: int(os.environ.get("FLOWMESH_PLANNER_SHARDS", "1")),
    show_default="$FLOWMESH_PLANNER_SHARDS or 1",
    help="how many planner shards run; every shard must be given the same number",
)
def planner_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    creds_path: str,
    metrics_port: int,
    shard: int,
    shards: int,
) -> None:
    """Run one planner shard: the workflows whose id hashes to SHARD of SHARDS."""
    try:
        parts = planner_part(shard, shards)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _serve(parts, nats_url, data_dir, cas_url, creds_path, metrics_port)


@click.command("scheduler")
@_common
@_scheduling
def scheduler_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    creds_path: str,
    metrics_port: int,
    dead_after: float,
    fleet_path: Path | None,
    policy_path: Path | None,
) -> None:
    """Run the scheduler: ready operators in, batch assignments to workers out."""
    _serve(
        SCHEDULER,
        nats_url,
        data_dir,
        cas_url,
        creds_path,
        metrics_port,
        dead_after,
        fleet_path,
        policy_path,
    )


@click.command("gateway")
@_common
@_console
def gateway_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    creds_path: str,
    metrics_port: int,
    console_port: int,
) -> None:
    """Run the tenant gateway (fm.api.<tenant>.*) and the web console."""
    _serve(
        GATEWAY,
        nats_url,
        data_dir,
        cas_url,
        creds_path,
        metrics_port,
        console_port=console_port,
    )


COMMANDS = (engine_command, planner_command, scheduler_command, gateway_command)
