"""The Prometheus exporter engine and workers both run (their metrics live in
engine/metrics.py and workers/metrics.py).

Metrics carry tenant names and per-tenant figures (costs, dedup hits: a live signal of
what other tenants run), so the exporter listens on loopback unless $FLOWMESH_METRICS_HOST
says otherwise, and a listener elsewhere answers only requests that carry
`Authorization: Bearer $FLOWMESH_METRICS_TOKEN` (Prometheus: `authorization.credentials`).
Without a token it refuses to listen anywhere but loopback.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = structlog.get_logger("flowmesh.metrics")

LOOPBACK = "127.0.0.1"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not news: no line per request on stderr."""


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guarded_app(token: str | None) -> Callable[..., Iterable[bytes]]:
    """The exporter's WSGI app, answering 401 without the bearer token when one is set."""
    app = make_wsgi_app()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if token is not None:
            given = environ.get("HTTP_AUTHORIZATION", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"metrics need Authorization: Bearer <FLOWMESH_METRICS_TOKEN>\n"]
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return guarded


def serve(port: int, addr: str | None = None, token: str | None = None) -> bool:
    """Expose /metrics on `port` (0: off). A port already taken is logged, not fatal:
    a shared component runs without its exporter rather than not at all."""
    if port <= 0:
        return False
    addr = addr or os.environ.get("FLOWMESH_METRICS_HOST", LOOPBACK)
    token = token or os.environ.get("FLOWMESH_METRICS_TOKEN") or None
    if not is_loopback(addr) and token is None:
        log.warning(
            "metrics stay on loopback: set FLOWMESH_METRICS_TOKEN to expose them",
            asked=addr,
        )
        addr = LOOPBACK
    try:
        httpd = make_server(
            addr, port, guarded_app(token), ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        log.warning("metrics exporter not started", port=port, error=str(exc))
        return False
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics exporter listening", host=addr, port=port, token=token is not None)
    return True


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """A labelled metric's child for these label values, looked up once: `labels()`
    validates and takes a lock on every call, which per operator cost the planner and
    the workers more than the increments. Label values here are tenants, kinds and
    classes: few, so the cache stays small."""
    return metric.labels(*labels)
