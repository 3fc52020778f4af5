"""`flowmesh lineage WF [NODE]`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from flowmesh.engine.cli_options import (
    _run,
    cas_option,
    client_cas,
    data_option,
    nats_option,
)
from flowmesh.engine.lineage.model import Lineage
from flowmesh.engine.lineage.openlineage import openlineage_events
from flowmesh.engine.lineage.pages import build_lineage_page
from flowmesh.engine.lineage.queries import build_lineage
from flowmesh.engine.lineage.render import render
from flowmesh.topics import codec
from flowmesh.topics.api import LineageCursor
from flowmesh.topics.lineage import collect_pages


@click.command("lineage")
@nats_option
@data_option
@cas_option
@click.argument("workflow_id")
@click.argument("node", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the whole graph as JSON")
@click.option(
    "--openlineage",
    "openlineage_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None,
    help="write OpenLineage 2-0-2 RunEvents to FILE as one JSON list ('-': stdout)",
)
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="operators shown per node (0: all)",
)
def lineage_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    workflow_id: str,
    node: str | None,
    as_json: bool,
    openlineage_file: Path | None,
    limit: int,
) -> None:
    """Print the graph that produced a workflow's results (or NODE's), down to the
    source data: every operator with its executor, params, inputs, output, worker,
    timing, attempts and the workflows/tenants that requested or reused it."""
    from flowmesh.engine.client import FlowMesh

    to_stdout = openlineage_file is not None and str(openlineage_file) == "-"
    if to_stdout and as_json:
        raise click.UsageError("--json and --openlineage - both want stdout; pick one")

    # the table shows `limit` operators per node: fetch one page of each node, so a
    # large workflow answers as fast as a small one; --json, --openlineage and --limit 0
    # want every operator
    per_node = limit if openlineage_file is None and not as_json else 0

    async def go() -> Lineage:
        async with await FlowMesh.connect(nats_url, client_cas(cas_url, data_dir)) as fm:
            if not per_node:
                return await build_lineage(fm, workflow_id, node)

            async def fetch(cursor: LineageCursor | None, size: int) -> Lineage:
                return await build_lineage_page(fm, workflow_id, node, cursor, size)

            return await collect_pages(fetch, per_node)

    lin = _run(go)
    if openlineage_file is not None:
        events = openlineage_events(lin)
        text = json.dumps(events, indent=1)
        if to_stdout:
            click.echo(text)
            return
        openlineage_file.write_text(text + "\n")
        Console(stderr=True).print(
            f"wrote {len(events)} OpenLineage events to {escape(str(openlineage_file))}"
        )
    if as_json:
        click.echo(json.dumps(codec.to_builtins(lin), default=str))
        return
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    render(lin, console, limit)
