"""Tools the end-to-end tests load into real worker processes with --plugin: one
deterministic (deduplicated like any operator) and one not (never deduplicated)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flowmesh.workers.executors.tool import tool


def _count(name: str, record: dict[str, Any]) -> None:
    # with $FM_COUNT_FILE set, every execution leaves a line there, so a test can count
    # real executions across worker processes (a deduplicated operator runs once)
    path = os.environ.get("FM_COUNT_FILE")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"tool": name, "record": record}, sort_keys=True) + "\n")


@tool("test.echo")
def echo(record: dict[str, Any], field: str = "text", output_field: str = "echo") -> dict[str, Any]:
    _count("test.echo", record)
    return {**record, output_field: record[field]}


@tool("test.now_ns", deterministic=False)
def now_ns(record: dict[str, Any], output_field: str = "now_ns") -> dict[str, Any]:
    _count("test.now_ns", record)
    return {**record, output_field: time.time_ns()}
