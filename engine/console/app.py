"""The web console: an aiohttp app the engine serves on `--console-port`.

One static page (static/index.html, plain HTML + JS, no build step) and a small API:

    GET /                               the page
    GET /api/events                     Server-Sent Events: a snapshot every interval
    GET /api/snapshot                   the same snapshot once (engine.monitor.Snapshot)
    GET /api/workflows                  workflows with their DAGs and operator counts
    GET /api/workflows/{id}             one workflow
    GET /api/workflows/{id}/lineage     its lineage graph (?node=NAME: that node and its
                                        ancestors), operator by operator (engine/lineage/);
                                        the first ?limit= (200) of each node, read as pages
    GET /api/workers                    workers
    GET /api/cost                       per-workflow and per-tenant bills (engine/cost.py)

Snapshots and bills are computed at most once per interval however many browsers watch,
and less often when a scan is slow (a scan of t seconds is reused for 5t), so the
console's load on the bus grows neither with its audience nor past a fifth of its time.
It runs in the gateway's process (`flowmesh gateway`), off the planner's event loop, on
either bus: on a Kafka-only fabric the process starts no tenant gateway (NATS
request/reply) but serves the console, whose reads (monitor, cost) go through the bus's
streams and KV and so see the same figures as on NATS. A
request that fails answers a JSON error; it never takes the engine down. Who may look,
and at what: access.py (the operator sees every tenant; a tenant logged in with its
credentials only its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from flowmesh.engine.console.access import Access, viewer_of
from flowmesh.engine.cost import CostReport, cost_report
from flowmesh.engine.gateway import redact_lineage
from flowmesh.engine.lineage import LineageError
from flowmesh.engine.lineage.pages import build_lineage_page
from flowmesh.engine.monitor import Snapshot, snapshot
from flowmesh.topics import Bus, codec
from flowmesh.topics.api import LINEAGE_PAGE, Lineage, LineageCursor
from flowmesh.topics.config.settings import Settings
from flowmesh.topics.lineage import collect_pages
from flowmesh.topics.store.cas import CAS

log = structlog.get_logger("flowmesh.console")

STATIC = Path(__file__).resolve().parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LINEAGE_PER_NODE = 200  # operators of each node a lineage answer shows unless asked
SCAN_SHARE_INVERSE = 5.0  # a scan that took t seconds is reused for at least 5t


@dataclass
class _Fabric:
    """What build_lineage needs: a bus and a CAS."""

    bus: Bus
    cas: CAS


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.warning("console request failed", path=request.path, error=str(exc))
        return _json({"error": f"{type(exc).__name__}: {exc}"}, status=500)


class ConsoleServer:
    def __init__(self, bus: Bus, cas: CAS, interval_s: float = 1.0) -> None:
        self.bus = bus
        self.cas = cas
        self.interval_s = interval_s
        self._latest: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._scan_s = 0.0  # how long the last scan took
        self._cost: tuple[float, CostReport] | None = None
        self._cost_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.access: Access | None = None  # made in start(), for the host it binds

    # --- data -------------------------------------------------------------------------

    def reuse_s(self) -> float:
        """How long a scan's result is served before the next scan."""
        # the scans read whole buckets: on a big fabric they may take a while, and the
        # console must not keep the bus busy, so it scans at most 20% of the time
        return max(self.interval_s, SCAN_SHARE_INVERSE * self._scan_s)

    async def latest(self) -> Snapshot:
        """A snapshot no older than the interval (longer when scans are slow), shared by
        every caller."""
        async with self._lock:
            if self._latest is None or time.time() - self._latest.at >= self.reuse_s():
                started = time.monotonic()
                self._latest = await snapshot(self.bus)
                self._scan_s = time.monotonic() - started
            return self._latest

    async def cost_report(self) -> CostReport:
        """The bills, computed at most as often as a snapshot (a scan of every operator)."""
        async with self._cost_lock:
            cached = self._cost
            if cached is None or time.monotonic() - cached[0] >= self.reuse_s():
                started = time.monotonic()
                report = await cost_report(self.bus)
                self._scan_s = max(self._scan_s, time.monotonic() - started)
                self._cost = cached = (time.monotonic(), report)
            return cached[1]

    # --- handlers ---------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def view(self, request: web.Request) -> dict[str, Any]:
        """The snapshot as the asker may see it: all of it for the operator; for a
        tenant its own workflows and bill, and nothing of the fleet's or others'."""
        data = (await self.latest()).to_dict()
        tenant = viewer_of(request).tenant
        if tenant is None:
            return data
        data["workflows"] = [w for w in data["workflows"] if w.get("tenant") == tenant]
        data["tenants"] = [t for t in data["tenants"] if t.get("tenant") == tenant]
        data["streams"], data["consumers"], data["workers"] = [], [], []
        data["ready_by_pool"], data["batches_in_flight"] = {}, 0
        data["dedup"] = {k: 0 for k in data["dedup"]}  # a fleet-wide, cross-tenant signal
        data["total_usd"] = data["total_energy_j"] = 0.0
        data["operators"] = 0
        data["errors"] = []
        return data

    async def get_snapshot(self, request: web.Request) -> web.Response:
        return _json(await self.view(request))

    async def workflows(self, request: web.Request) -> web.Response:
        return _json((await self.view(request))["workflows"])

    async def workflow(self, request: web.Request) -> web.Response:
        wf_id = request.match_info["wf"]
        for w in (await self.view(request))["workflows"]:
            if w["workflow_id"] == wf_id:
                return _json(w)
        return _json({"error": f"no workflow {wf_id!r}"}, status=404)

    async def lineage(self, request: web.Request) -> web.Response:
        wf_id = request.match_info["wf"]
        node = request.query.get("node") or None
        tenant = viewer_of(request).tenant
        if tenant is not None and not wf_id.startswith(f"{tenant}_"):
            # another tenant's workflow answers as a missing one, without a lookup
            return _json({"error": f"no workflow {wf_id!r}"}, status=404)
        try:
            limit = max(1, min(int(request.query.get("limit", LINEAGE_PER_NODE)), LINEAGE_PAGE))
        except ValueError:
            return _json({"error": "limit: a whole number"}, status=400)
        fabric = _Fabric(self.bus, self.cas)

        async def fetch(cursor: LineageCursor | None, size: int) -> Lineage:
            return await build_lineage_page(fabric, wf_id, node, cursor, size)

        try:
            # a page of each node: what a request reads grows with what it shows
            lin = await collect_pages(fetch, limit)
        except LineageError:
            return _json({"error": f"no workflow {wf_id!r}"}, status=404)
        out = codec.to_builtins(lin)
        if tenant is not None:
            if out.get("tenant") not in (None, tenant):
                return _json({"error": f"no workflow {wf_id!r}"}, status=404)
            out = redact_lineage(out, tenant)
        return _json(out)

    async def workers(self, request: web.Request) -> web.Response:
        return _json((await self.view(request))["workers"])

    async def cost(self, request: web.Request) -> web.Response:
        report = await self.cost_report()
        tenant = viewer_of(request).tenant
        if tenant is not None:
            own = {k: b for k, b in report.workflows.items() if b.tenant == tenant}
            bill = report.tenants.get(tenant)
            return _json(
                {
                    "workflows": {k: {"id": k, **b.as_dict()} for k, b in own.items()},
                    "tenants": {tenant: bill.as_dict()} if bill else {},
                }
            )
        return _json(
            {
                "workflows": {k: {"id": k, **b.as_dict()} for k, b in report.workflows.items()},
                "tenants": {k: b.as_dict() for k, b in report.tenants.items()},
                "total_usd": report.total_usd,
                "total_energy_j": report.total_energy_j,
                "total_device_seconds": report.total_device_seconds,
                "operators": report.operators,
            }
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a reverse proxy must not hold events back
            }
        )
        await resp.prepare(request)
        # the browser reconnects on its own after a drop; tell it how soon
        await resp.write(f"retry: {int(self.interval_s * 1000)}\n\n".encode())
        try:
            while not self._stopping.is_set():
                try:
                    body = msgspec.json.encode(await self.view(request))
                    await resp.write(b"event: snapshot\ndata: " + body + b"\n\n")
                except (ConnectionResetError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # the bus hiccuped: say so, keep the stream
                    err = msgspec.json.encode({"error": str(exc)})
                    await resp.write(b"event: failure\ndata: " + err + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval_s)
        except ConnectionResetError:
            pass  # the browser went away
        return resp

    # --- lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        middlewares: list[Middleware] = [_errors]
        if self.access is not None:
            middlewares.insert(0, self.access.middleware())
        app = web.Application(middlewares=middlewares)
        app.add_routes(
            [
                web.get("/", self.index),
                web.get("/api/snapshot", self.get_snapshot),
                web.get("/api/events", self.events),
                web.get("/api/workflows", self.workflows),
                web.get("/api/workflows/{wf}", self.workflow),
                web.get("/api/workflows/{wf}/lineage", self.lineage),
                web.get("/api/workers", self.workers),
                web.get("/api/cost", self.cost),
                web.static("/static", STATIC),
            ]
        )
        return app

    async def start(self, port: int, host: str | None = None) -> int:
        """Listen on `port` (0: any free port); returns the port bound.

        Loopback unless the console_host setting ($FLOWMESH_CONSOLE_HOST) says
        otherwise; elsewhere every request needs a tenant login or the operator token
        (access.py)."""
        host = host or Settings.load().console_host
        if self.access is None:
            self.access = Access(host, _nats_url(self.bus))
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, shutdown_timeout=2.0)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        self.access.port = self.port
        log.info(
            "console listening",
            url=f"http://{host}:{self.port}/",
            tenant_logins=self.access.tenant_logins,  # False on Kafka-only: operator only
        )
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()


def _nats_url(bus: Bus) -> str | None:
    """The server the engine is on, without its credentials: tenant logins go there.
    None on a Kafka-only bus (no server: the operator alone logs in, access.py)."""
    if not bus.has_nats:  # its `nc` raises on any attribute asked of it
        return None
    nc = getattr(bus, "nc", None)
    url = getattr(nc, "connected_url", None) if nc is not None else None
    if url is None or url.hostname is None:
        return None
    return f"{url.scheme}://{url.hostname}:{url.port or 4222}"


async def start_console(bus: Bus, cas: CAS, port: int, interval_s: float = 1.0) -> ConsoleServer:
    server = ConsoleServer(bus, cas, interval_s)
    await server.start(port)
    return server
