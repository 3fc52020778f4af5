"""Transforms the end-to-end tests load into real worker processes with --plugin."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flowmesh.workers.executors.transform import transform


@transform("test.slow_upper", kind="map")
def slow_upper(record: dict[str, Any], field: str, delay: float = 0.1) -> dict[str, Any]:
    # slow enough that a batch is still running when the test kills its worker
    time.sleep(delay)
    return {**record, field: str(record[field]).upper()}


@transform("test.count_upper", kind="map")
def count_upper(record: dict[str, Any], field: str) -> dict[str, Any]:
    # every execution leaves a line in $FM_COUNT_FILE, so tests count real executions
    # across worker processes
    with open(os.environ["FM_COUNT_FILE"], "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    return {**record, field: str(record[field]).upper()}


def _log_execution(record: dict[str, Any]) -> None:
    # one line per execution (with the worker's pid) in $FM_COUNT_FILE, when set
    path = os.environ.get("FM_COUNT_FILE")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"record": record, "pid": os.getpid()}, sort_keys=True) + "\n")


@transform("test.fail_on", kind="map")
def fail_on(record: dict[str, Any], field: str, bad: str) -> dict[str, Any]:
    """Upper-cases `field`, but raises on a record whose `field` equals `bad`: poison."""
    _log_execution(record)
    if record[field] == bad:
        raise ValueError(f"poison record {record[field]!r}")
    return {**record, field: str(record[field]).upper()}


@transform("test.fail_first", kind="map")
def fail_first(record: dict[str, Any], field: str, times: int) -> dict[str, Any]:
    """Raises on the first `times` executions of each record, then upper-cases it: a
    transient failure. Executions are counted in $FM_COUNT_FILE, across workers."""
    _log_execution(record)
    with open(os.environ["FM_COUNT_FILE"]) as fh:
        seen = sum(json.loads(line).get("record") == record for line in fh)
    if seen <= times:
        raise RuntimeError(f"transient failure {seen} of {times}")
    return {**record, field: str(record[field]).upper()}


@transform("test.crash_on", kind="map")
def crash_on(record: dict[str, Any], field: str, bad: str) -> dict[str, Any]:
    # a record that kills whichever process runs it (a segfault, an OOM kill): no
    # exception to catch, the worker is simply gone
    if record[field] == bad:
        os._exit(17)
    return {**record, field: str(record[field]).upper()}


@transform("test.spin", kind="map")
def spin(record: dict[str, Any], field: str = "text", seconds: float = 1.0) -> dict[str, Any]:
    """Busy for `seconds` in plain Python (no sleep, no regex): an operator that only
    the worker's wall-time limit stops."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return {**record, "spins": n}
