"""The web console on a Kafka-only fabric (FLOWMESH_KV=kafka): no nats-server holds the
tenants' passwords, so the console admits the operator alone (engine/console/access.py).
The same console on a real Kafka-only fabric, beside a NATS one: the slow test in
tests/test_dashboards_on_both_buses.py."""

from __future__ import annotations

import base64

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flowmesh.engine.console import access as access_module
from flowmesh.engine.console.access import Access
from flowmesh.engine.local import free_port

TOKEN = "operator-s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
TENANT_LOGIN = {"Authorization": "Basic " + base64.b64encode(b"tenant-acme:any-password").decode()}


async def test_kafka_only_console_refuses_tenant_logins_and_says_why() -> None:
    """With no nats-server to check a tenant's password (nats_url None), a tenant login
    is a 401 that names the reason, with no Basic challenge a browser would prompt for;
    the operator's token is let in, and a loopback console with no token is open to the
    machine's users as on NATS."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    for token in (TOKEN, None):
        access = Access("127.0.0.1", nats_url=None, token=token, extra_hosts=frozenset())
        assert not access.tenant_logins
        app = web.Application(middlewares=[access.middleware()])
        app.router.add_get("/api/snapshot", ok)
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        access.port = server.port or 0
        url = f"http://127.0.0.1:{access.port}/api/snapshot"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(url, headers=TENANT_LOGIN) as resp:
                    assert resp.status == 401
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    error = (await resp.json())["error"]
                    assert "Kafka-only" in error and "operator token" in error, error
                async with http.get(url) as resp:
                    assert resp.status == (401 if token else 200)
                    if token:
                        assert "Kafka-only" not in (await resp.json())["error"]
                if token:
                    async with http.get(url, headers=BEARER) as resp:
                        assert resp.status == 200
        finally:
            await server.close()


async def test_with_a_nats_server_a_refusal_still_offers_tenant_logins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """And a login the server cannot answer (it is away) is refused in bounded time."""
    monkeypatch.setattr(access_module, "LOGIN_TIMEOUT_S", 1.0)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    # a server that refuses every login (nothing listens): the challenge is still Basic
    access = Access("127.0.0.1", nats_url=f"nats://127.0.0.1:{free_port()}", token=TOKEN)
    assert access.tenant_logins
    app = web.Application(middlewares=[access.middleware()])
    app.router.add_get("/api/snapshot", ok)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    access.port = server.port or 0
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{access.port}/api/snapshot", headers=TENANT_LOGIN) as resp,
        ):
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
            assert "Kafka-only" not in (await resp.json())["error"]
    finally:
        await server.close()


async def test_a_server_without_auth_vouches_for_no_tenant_login(nats_url: str) -> None:
    """A nats-server run without auth takes any password: a Basic login as tenant-acme
    with any password must not show acme's view (it did, even with a token set)."""
    access = Access("127.0.0.1", nats_url=nats_url, token=TOKEN, extra_hosts=frozenset())
    value = TENANT_LOGIN["Authorization"].removeprefix("Basic ")
    assert await access._tenant_login(value) is None
