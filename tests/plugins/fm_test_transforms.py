"""Transforms the end-to-end tests load into real worker processes with --plugin."""

from __future__ import annotations

import time
from typing import Any

from workers.executors.transform import transform


@transform("test.slow_upper", kind="map")
def slow_upper(record: dict[str, Any], field: str, delay: float = 0.1) -> dict[str, Any]:
    # slow enough that a batch is still running when the test kills its worker
    time.sleep(delay)
    return {**record, field: str(record[field]).upper()}
