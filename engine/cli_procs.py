"""`flowmesh engine | planner | scheduler | gateway`: the engine's processes in the
foreground. `engine` runs every part in one process; the others run one part each, the
way `flowmesh up` and deploy/ run them (engine/service.py)."""

from __future__ import annotations

import asyncio
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
    kafka_servers,
    kv_store,
    nats_option,
    scheduler_option,
    settings,
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
        default=lambda: settings().metrics_port,
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
    default=lambda: settings().console_port,
    type=int,
    show_default="$FLOWMESH_CONSOLE_PORT or 0 (off)",
    help="serve the web console on this port (0: off)",
)


_planning = _stack(
    click.option(
        "--max-attempts",
        type=click.IntRange(min=1),
        default=None,
        help="runs of an operator that raises before it is committed failed "
        "(default $FLOWMESH_MAX_ATTEMPTS or 3); travels with each operator",
    ),
    click.option(
        "--max-reclaims",
        type=click.IntRange(min=3),
        default=None,
        help="times an operator's worker may be lost under it before it is failed "
        "(default $FLOWMESH_MAX_RECLAIMS or 6); travels with each operator",
    ),
)


def _serve(
    parts: Parts,
    *,
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    creds_path: str,
    metrics_port: int,
    bus: str | None,
    kafka: str | None,
    kv: str | None = None,
    scheduler: str | None = None,
    dead_after: float = 5.0,
    fleet_path: Path | None = None,
    policy_path: Path | None = None,
    console_port: int = 0,
    max_attempts: int | None = None,
    max_reclaims: int | None = None,
) -> None:
    """Run `parts` with what the flags say, the settings (environment, file) filling in
    the rest; each value goes on as an argument."""
    from flowmesh.engine.service import serve
    from flowmesh.topics.config.creds import CredsError, resolve_url

    try:
        url = resolve_url(nats_url, creds_path)
    except CredsError as exc:
        raise click.UsageError(str(exc)) from exc
    chosen = settings().updated(
        scheduler=scheduler, max_attempts=max_attempts, max_reclaims=max_reclaims
    )
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
            kafka=kafka_servers(bus, kafka),
            kv=kv_store(kv),
            scheduler=chosen.scheduler,
            max_attempts=chosen.max_attempts,
            max_reclaims=chosen.max_reclaims,
        )
    )


@click.command("engine")
@_common
@_scheduling
@_planning
@_console
def engine_command(**opts: Any) -> None:
    """Run the whole engine (planner + scheduler + tenant gateway) in one process."""
    _serve(ALL, **opts)


@click.command("planner")
@_common
@_planning
@click.option(
    "--shard",
    type=int,
    envvar="FLOWMESH_PLANNER_SHARD",
    default=0,
    show_default="$FLOWMESH_PLANNER_SHARD or 0",
    help="this planner's shard, 0..SHARDS-1 (deploy/: the StatefulSet pod's ordinal)",
)
@click.option(
    "--shards",
    type=int,
    envvar="FLOWMESH_PLANNER_SHARDS",
    default=1,
    show_default="$FLOWMESH_PLANNER_SHARDS or 1",
    help="how many planner shards run; every shard must be given the same number",
)
def planner_command(shard: int, shards: int, **opts: Any) -> None:
    """Run one planner shard: the workflows whose id hashes to SHARD of SHARDS."""
    try:
        parts = planner_part(shard, shards)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _serve(parts, **opts)


@click.command("scheduler")
@_common
@_scheduling
def scheduler_command(**opts: Any) -> None:
    """Run the scheduler: ready operators in, batch assignments to workers out."""
    _serve(SCHEDULER, **opts)


@click.command("gateway")
@_common
@_console
def gateway_command(**opts: Any) -> None:
    """Run the tenant gateway (fm.api.<tenant>.*) and the web console (on a Kafka-only
    fabric, FLOWMESH_KV=kafka: the console alone, the gateway being NATS request/reply)."""
    _serve(GATEWAY, **opts)


COMMANDS = (engine_command, planner_command, scheduler_command, gateway_command)
