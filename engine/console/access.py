"""Who may read the console, and what they see.

* The Host header must name the console as it was bound (127.0.0.1, localhost, ::1 with
  its port) or one of $FLOWMESH_CONSOLE_HOSTS: a page on another site whose name
  re-resolves to 127.0.0.1 (DNS rebinding) sends its own name and is refused.
* The operator: `Authorization: Bearer $FLOWMESH_CONSOLE_TOKEN`, or, on a loopback
  listener with no token set, anyone who can reach it (the machine's own users).
* A tenant: HTTP Basic with the user and password of its credentials file (`flowmesh auth
  init`); the password is checked by the nats-server itself (a login with it; a server
  run without auth, which takes any password, admits no tenant login), and a
  success is remembered for a few minutes, so a page's polling does not cost a bcrypt
  check per request. A tenant sees only its own workflows, lineage and cost.
* Anything else, and every request to a listener that is not loopback without a token or
  a tenant login, gets 401.

On a Kafka-only fabric (FLOWMESH_KV=kafka) there is no nats-server, so nothing holds the
tenants' passwords (`flowmesh auth init` writes them into the nats-server's config) and
nothing here could check one: the console admits the operator alone (the token, or a
loopback listener with none set), and a tenant login answers 401 saying so, rather than
being taken on trust or checked against a second copy of the secrets. A tenant there has
no view of its own in the console; it has none on the bus either (Kafka-only has no
per-tenant permissions: every client can read every topic), so the operator decides who
sees what, e.g. behind a proxy that adds the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from flowmesh.engine.auth import TENANT_USER_PREFIX

log = structlog.get_logger("flowmesh.console")

VIEWER = "flowmesh.viewer"  # request[VIEWER]: who asked
LOGIN_TTL_S = 300.0  # a checked tenant login is trusted this long
FAILED_TTL_S = 30.0  # a failed one is refused this long without asking the server again
LOGIN_TIMEOUT_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Viewer:
    tenant: str | None  # None: the operator, who sees every tenant


OPERATOR = Viewer(None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Access:
    def __init__(
        self,
        bind_host: str,
        nats_url: str | None,
        token: str | None = None,
        extra_hosts: frozenset[str] | None = None,
    ) -> None:
        self.bind_host = bind_host
        self.loopback = is_loopback(bind_host)
        self.nats_url = nats_url
        self.token = token if token is not None else os.environ.get("FLOWMESH_CONSOLE_TOKEN")
        raw = os.environ.get("FLOWMESH_CONSOLE_HOSTS", "")
        self.extra_hosts = (
            extra_hosts
            if extra_hosts is not None
            else frozenset(h.strip().lower() for h in raw.split(",") if h.strip())
        )
        self.port = 0
        # sha256(user, password) -> (tenant or None for a refusal, when it expires)
        self._logins: dict[bytes, tuple[str | None, float]] = {}

    def host_allowed(self, host: str) -> bool:
        host = host.lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host in self.extra_hosts or name in self.extra_hosts:
            return True
        local = {"127.0.0.1", "localhost", "[::1]"}
        if not self.loopback:
            local.add(self.bind_host.lower())
        return name in local and host.endswith(f":{self.port}")

    async def viewer(self, request: web.Request) -> Viewer | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token:
            return OPERATOR if hmac.compare_digest(value.strip(), self.token) else None
        if scheme.lower() == "basic":
            return await self._tenant_login(value.strip())
        if not header and self.loopback and not self.token:
            return OPERATOR
        return None

    async def _tenant_login(self, value: str) -> Viewer | None:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not user.startswith(TENANT_USER_PREFIX) or not password or self.nats_url is None:
            return None
        tenant = user.removeprefix(TENANT_USER_PREFIX)
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        now = time.monotonic()
        hit = self._logins.get(key)
        if hit is not None and hit[1] > now:
            return Viewer(hit[0]) if hit[0] is not None else None
        ok = await self._server_accepts(user, password)
        if len(self._logins) > 10_000:
            self._logins = {k: v for k, v in self._logins.items() if v[1] > now}
        self._logins[key] = (tenant if ok else None, now + (LOGIN_TTL_S if ok else FAILED_TTL_S))
        return Viewer(tenant) if ok else None

    async def _server_accepts(self, user: str, password: str) -> bool:
        """The nats-server checks the password (its bcrypt hash is in its config)."""
        assert self.nats_url is not None

        async def quiet(exc: Exception) -> None:
            pass  # the outcome is logged once below, not a traceback per attempt

        try:
            # bounded as a whole: with the server away nats-py tries its first connect
            # again and again, and the browser's request would hang with it
            nc = await asyncio.wait_for(
                nats.connect(
                    self.nats_url,
                    user=user,
                    password=password,
                    connect_timeout=LOGIN_TIMEOUT_S,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                    name="flowmesh-console-login",
                ),
                LOGIN_TIMEOUT_S,
            )
        except Exception as exc:  # refused, or the server is away: not logged in
            log.info("console login refused", user=user, error=type(exc).__name__)
            return False
        # a server run without auth takes any password: it vouches for nobody, and
        # "tenant-x" with any password would read x's workflows. nats-py keeps the
        # server's INFO only in a private field: without it, refuse (never admit)
        checks = bool(getattr(nc, "_server_info", {}).get("auth_required", False))
        await nc.close()
        if not checks:
            log.warning(
                "console tenant login refused: the nats-server checks no passwords", user=user
            )
        return checks

    @property
    def tenant_logins(self) -> bool:
        """Whether a tenant can log in: only with a nats-server to check its password."""
        return self.nats_url is not None

    def refusal(self, request: web.Request) -> tuple[str, str]:
        """Why a request was refused (401), and the WWW-Authenticate challenge to send."""
        if self.tenant_logins:
            return (
                "log in with your tenant credentials or the operator token",
                'Basic realm="flowmesh", charset="UTF-8"',
            )
        scheme = request.headers.get("Authorization", "").partition(" ")[0].lower()
        why = "this console admits only the operator token (Authorization: Bearer)"
        if scheme == "basic":
            why = (
                "tenant logins are checked by the NATS server, and this fabric has none "
                "(Kafka-only, FLOWMESH_KV=kafka): " + why
            )
        # no Basic challenge: a browser's password prompt could never succeed here
        return why, 'Bearer realm="flowmesh"'

    def middleware(self) -> Middleware:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not self.host_allowed(request.host):
                return web.json_response(
                    {"error": "this console is not served under that name"}, status=403
                )
            viewer = await self.viewer(request)
            if viewer is None:
                why, challenge = self.refusal(request)
                return web.json_response(
                    {"error": why}, status=401, headers={"WWW-Authenticate": challenge}
                )
            request[VIEWER] = viewer
            return await handler(request)

        return guard


def viewer_of(request: web.Request) -> Viewer:
    viewer = request.get(VIEWER)
    return viewer if isinstance(viewer, Viewer) else OPERATOR
