"""The Prometheus exporter engine and workers both run (their metrics live in
engine/metrics.py and workers/metrics.py)."""

from __future__ import annotations

import structlog
from prometheus_client import start_http_server

log = structlog.get_logger("flowmesh.metrics")


def serve(port: int, addr: str = "0.0.0.0") -> bool:
    """Expose /metrics on `port` (0: off). A port already taken is logged, not fatal:
    a shared component runs without its exporter rather than not at all."""
    if port <= 0:
        return False
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        log.warning("metrics exporter not started", port=port, error=str(exc))
        return False
    log.info("metrics exporter listening", port=port)
    return True
