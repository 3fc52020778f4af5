"""Lineage of results (issue 3): being written."""

from __future__ import annotations

import click


@click.command("lineage")
def lineage_command() -> None:
    """Print the graph that produced a workflow's results."""
    raise click.ClickException("not implemented yet")
