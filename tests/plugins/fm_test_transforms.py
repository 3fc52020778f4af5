"""Transforms the end-to-end tests load into real worker processes with --plugin."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from workers.executors.transform import transform


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
