"""Cache inspection, invalidation and CAS garbage collection (issue 3): being written."""

from __future__ import annotations

import click


@click.group("cache")
def cache_group() -> None:
    """Inspect and invalidate cached operator results; garbage-collect the CAS."""
