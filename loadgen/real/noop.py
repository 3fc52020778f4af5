"""The no-op transform the overhead benchmark runs: workers load it with
`--plugin loadgen.real.noop`, so every operator costs only the fabric's own work."""

from __future__ import annotations

from typing import Any

from flowmesh.workers.executors.transform import transform


@transform("bench.noop", kind="map")
def noop(record: dict[str, Any]) -> dict[str, Any]:
    return record


@transform("bench.hop", kind="map")
def hop(record: dict[str, Any]) -> dict[str, Any]:
    """One stage of the latency chain: new content per stage, so no stage is a cache hit."""
    return {**record, "hop": int(record.get("hop", 0)) + 1}
