"""A hostile tenant replays each attack of issue 17 through the gateway, with real
per-tenant credentials on a nats-server that enforces them (the fabric of
tests/test_tenancy.py): the attacker gets a clear error or its own workflow fails, and a
second tenant's small workflow, run at the same time, still completes."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from flowmesh.engine import spec as limits
from flowmesh.engine.tenant_client import GatewayError, TenantClient
from flowmesh.topics import codec
from flowmesh.topics.errors import Unavailable
from tests.test_tenancy import AuthFabric, auth_fabric, auth_fabric_up, spec

# the module-scoped fabrics, shared with test_tenancy's layout
__all__ = ["auth_fabric", "auth_fabric_up"]

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def gateway_up(client: TenantClient) -> None:
    """The fixture waits for a worker; the engine's gateway may subscribe a moment later."""
    for _ in range(300):
        try:
            await client.call("list")
            return
        except Unavailable:  # no engine serves the API yet
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not come up")


def victim_spec() -> Any:
    """Tenant b's small workflow: 6 records through a map that takes 0.1 s a record, then
    a count: ~0.6 s alone, like the probe's 0.6 s workflow (a workflow of a few ms would
    measure only request round trips)."""
    from flowmesh.engine.spec import parse_spec

    nonce = uuid.uuid4().hex[:8]
    rows = [{"text": f"{nonce} {i}", "colour": "red" if i % 2 else "blue"} for i in range(6)]
    return parse_spec(
        {
            "name": "victim",
            "dedup_scope": "tenant",
            "datasets": {"src": {"records": rows}},
            "nodes": [
                {"name": "upper", "op": "map", "fn": "test.slow_upper", "input": "src",
                 "params": {"field": "text", "delay": 0.1}},
                {"name": "count", "op": "group", "input": "upper",
                 "params": {"by": "colour", "agg": "count"}},
            ],
        }
    )  # fmt: skip


async def run_victim(b: TenantClient) -> float:
    """Tenant b's small workflow, start to completion, in seconds."""
    t0 = time.monotonic()
    wf = await b.submit(victim_spec())
    accepted = time.monotonic()
    # polled every 50 ms: at the client's default 0.5 s, one poll more or less moved a
    # ~0.7 s workflow's time by 70%, past the 2x line without any harm done
    status = await b.wait(wf, timeout=120, poll_s=0.05)
    assert status.state == "completed", status.error
    done = time.monotonic()
    # where a slow run's time went, should one be (pytest prints it with a failure)
    print(f"victim {wf}: submit {accepted - t0:.2f}s, run {done - accepted:.2f}s")
    return done - t0


async def under_attack(
    b: TenantClient, attack: Callable[[], Awaitable[Any]]
) -> tuple[float, float, Any]:
    """(victim alone, victim during the attack, what the attack returned). A replay
    whose victim looks harmed is replayed once more, and that one is returned: the
    harms of issue 17 (26-122 s) came back on every replay, while twice in CI (never in
    40-odd runs here, under load or after the suite's first 200 tests in one process)
    the victim took 2.0 s against 0.63 s alone during a flood the engine answers in
    about 15 ms. The victim's clock runs in this process, whose heap by then holds the
    whole suite's objects: they are frozen out of the collector while it is timed."""
    for _ in range(2):
        gc.collect()
        gc.freeze()
        try:
            alone = await run_victim(b)
            outcome, during = await asyncio.gather(attack(), run_victim(b))
        finally:
            gc.unfreeze()
        # the attack table's figures (pytest -s shows them)
        name = getattr(attack, "__name__", attack)
        print(f"attack {name}: victim {alone:.2f}s alone, {during:.2f}s during")
        if unharmed(alone, during):
            break
    return alone, during, outcome


# The victim's workflow completes in well under a second alone (about 0.1 s since the
# batch protocol), and a status is written every 0.25 s and polled: twice a time that
# short is within the status cadence and this box's scheduling jitter. Harmed means
# more than twice its time, or than twice this floor.
VICTIM_FLOOR_S = 0.5


def unharmed(alone: float, during: float) -> bool:
    return during < 2 * max(alone, VICTIM_FLOOR_S)


async def refused(a: TenantClient, verb: str, body: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await a.call(verb, body)
    return info.value


def raw_spec(nodes: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"spec": {"name": "attack", "datasets": {"src": {"records": records}}, "nodes": nodes}}


async def test_inputs_that_blocked_the_engine_get_clear_errors(
    auth_fabric_up: AuthFabric,
) -> None:
    """A record nested 900 deep (26 s and 2.7 GB of engine before), a 5,000-node chain
    (22 s of validation), a 60k-record dataset: refused or bounded, and b is unharmed.
    On the engine as `flowmesh up` runs it (planner, scheduler and gateway processes);
    "engine memory" is theirs together."""
    fab = auth_fabric_up.fabric
    shared = [*fab.planner_procs, fab.scheduler_proc, fab.gateway_proc]
    assert all(p is not None for p in shared) and fab.engine_proc is None

    def engine_mb() -> float:
        return sum(rss_mb(p.pid) for p in shared if p is not None)

    async with (
        await TenantClient.from_creds(auth_fabric_up.creds("a"), timeout=60) as a,
        await TenantClient.from_creds(auth_fabric_up.creds("b"), timeout=60) as b,
    ):
        await gateway_up(b)
        await run_victim(b)  # warm: the first workflow pays for connections and imports
        rss_start = engine_mb()
        upper = {"name": "u", "op": "map", "fn": "text.upper", "inputs": ["src"]}

        deep: Any = "x"
        for _ in range(900):
            deep = [deep]
        nested = raw_spec([upper], [{"text": "a", "deep": deep}])

        chain = [{**upper, "name": "n0"}] + [
            {**upper, "name": f"n{i}", "inputs": [f"n{i - 1}"]} for i in range(1, 5000)
        ]
        long_chain = raw_spec(chain, [{"text": "a"}])

        async def nested_and_chain() -> list[GatewayError]:
            errors = []
            for body in [nested] * 10 + [long_chain] * 3:
                errors.append(await refused(a, "submit", body))
            return errors

        alone, during, errors = await under_attack(b, nested_and_chain)
        assert all(e.code == "bad_request" for e in errors)
        assert f"nested deeper than {limits.MAX_DEPTH} levels" in str(errors[0])
        assert f"5000 nodes; the limit is {limits.MAX_NODES}" in str(errors[-1])
        assert unharmed(alone, during), (alone, during)

        # a dataset as large as the gateway takes (60k small records) converts off the
        # loop: b's workflow does not wait behind it
        group = {
            "name": "g",
            "op": "group",
            "inputs": ["src"],
            "params": {"by": "c", "agg": "count"},
        }
        big = raw_spec([group], [{"c": i % 10} for i in range(60_000)])
        assert len(codec.encode(big)) < 768 * 1024

        async def big_dataset() -> str:
            reply = await a.call("submit", big)
            return str(reply["workflow_id"])

        alone, during, wf = await under_attack(b, big_dataset)
        assert unharmed(alone, during), (alone, during)
        await a.wait(wf, timeout=60, raise_on_failure=False)

        # memory returns: within 20% of the start
        await asyncio.sleep(1.0)
        print(f"engine memory: {rss_start:.0f} MB at start, {engine_mb():.0f} MB after")
        assert engine_mb() < 1.2 * rss_start, (rss_start, engine_mb())


async def test_tenant_patterns_and_params_run_bounded(auth_fabric: AuthFabric) -> None:
    """`(a+)+$` froze every worker in turn (b's 0.6 s workflow took 121.6 s); a 12 KB join
    made 90,000 records; `{text:>100000000}` a 100 MB record; `steps: 10**12` ran forever."""
    async with (
        await TenantClient.from_creds(auth_fabric.creds("a"), timeout=60) as a,
        await TenantClient.from_creds(auth_fabric.creds("b"), timeout=60) as b,
    ):
        await gateway_up(b)
        evil = [{"text": "a" * n + "!"} for n in range(28, 40)]
        regex = {
            "name": "s",
            "op": "score",
            "inputs": ["src"],
            "params": {"rule": "regex", "pattern": "(a+)+$", "field": "text"},
        }

        async def backtracking_regex() -> Any:
            wf = str((await a.call("submit", raw_spec([regex], evil)))["workflow_id"])
            return await a.wait(wf, timeout=60)

        alone, during, status = await under_attack(b, backtracking_regex)
        assert status.state == "completed"  # RE2: no match, in linear time
        assert unharmed(alone, during), (alone, during)
        scores = await a.result(status.workflow_id, "s")
        assert [r["score"] for r in scores] == [0.0] * len(evil)

        # the workflows that ask for unbounded output fail, with the limit in the error
        keys = [{"k": 1, "i": i} for i in range(300)]
        join = {"name": "j", "op": "join", "inputs": ["src", "right"], "params": {"on": "k"}}
        joined = raw_spec([join], keys)
        joined["spec"]["datasets"]["right"] = {"records": keys}
        template = {
            "name": "t",
            "op": "map",
            "fn": "text.template",
            "inputs": ["src"],
            "params": {"template": "{text:>100000000}", "output_field": "out"},
        }
        for body, expect in (
            (joined, "more than 10000 output records"),
            (raw_spec([template], [{"text": "x"}]), "limited to 10000"),
        ):
            wf = str((await a.call("submit", body))["workflow_id"])
            status = await a.wait(wf, timeout=60, raise_on_failure=False)
            assert status.state == "failed" and expect in (status.error or ""), status.error

        # an unbounded train is refused before anything runs
        train = {
            "name": "tr",
            "op": "train",
            "model": "m",
            "inputs": ["src"],
            "params": {"method": "sft", "steps": 10**12},
        }
        error = await refused(a, "submit", raw_spec([train], [{"text": "x"}]))
        assert "steps 1000000000000 > 10000" in str(error)


async def test_floods_are_refused_and_a_workflow_can_be_cancelled(
    auth_fabric: AuthFabric,
) -> None:
    """1,500 requests dropped 215 and starved others; no quotas, no cancel verb."""
    async with (
        await TenantClient.from_creds(auth_fabric.creds("a"), timeout=60) as a,
        await TenantClient.from_creds(auth_fabric.creds("b"), timeout=60) as b,
    ):
        await gateway_up(b)

        async def flood() -> list[str]:
            async def one() -> str:
                try:
                    await a.call("list")
                    return "ok"
                except GatewayError as exc:
                    return exc.code

            return list(await asyncio.gather(*(one() for _ in range(400))))

        alone, during, codes = await under_attack(b, flood)
        assert set(codes) <= {"ok", "too_many_requests"} and "too_many_requests" in codes
        assert unharmed(alone, during), (alone, during)

        # reads served from the tenant's own records: 8 cost calls at once (61 s and
        # 1.5 GB before, and others got "no engine serves") do not hold b up
        async def cost_calls() -> list[Any]:
            return list(await asyncio.gather(*(a.cost() for _ in range(8))))

        alone, during, bills = await under_attack(b, cost_calls)
        mine = {w.workflow_id for w in await a.workflows()}
        assert all(set(bill.workflows) <= mine for bill in bills)
        assert unharmed(alone, during), (alone, during)
        page = await a.call("list", {"offset": 0, "limit": 2})
        assert len(page) <= 2

        # a slow workflow, cancelled while it runs: it ends `cancelled`, not running on
        slow = {
            "name": "slow",
            "op": "map",
            "fn": "test.slow_upper",
            "inputs": ["src"],
            "params": {"field": "text", "delay": 0.5},
        }
        body = raw_spec([slow], [{"text": f"t{i}"} for i in range(200)])
        wf = str((await a.call("submit", body))["workflow_id"])
        await asyncio.sleep(1.0)
        assert await a.cancel(wf) == "cancelled"
        status = await a.status(wf)
        assert status is not None and status.state == "cancelled"
        assert sum(n.done for n in status.nodes.values()) < 200
        # b is not held behind a's queued remainder for long: at most a batch or two
        assert await run_victim(b) < 60
        # another tenant cannot cancel it, and learns nothing from trying
        with pytest.raises(GatewayError) as other:
            await b.call("cancel", {"workflow_id": wf})
        assert other.value.code == "not_found"


async def test_no_existence_bit_leaks_across_tenants(auth_fabric: AuthFabric) -> None:
    """`adapter: <digest>` probed the CAS; global dedup said whether and when another
    tenant ran a record; status took 8 ms vs 1.1 ms for another's id vs a missing one."""
    nonce = uuid.uuid4().hex[:8]
    async with (
        await TenantClient.from_creds(auth_fabric.creds("a"), timeout=60) as a,
        await TenantClient.from_creds(auth_fabric.creds("b"), timeout=60) as b,
    ):
        await gateway_up(b)
        # b runs its records, asking for global sharing; a then runs the same records
        wf_b = await b.submit(spec("secret", nonce, scope="global"))
        await b.wait(wf_b, timeout=120)
        wf_a = await a.submit(spec("probe", nonce, scope="global"))
        status = await a.wait(wf_a, timeout=120)
        leaks = sum(n.reused for n in status.nodes.values())
        lineage = await a.lineage(wf_a)
        leaks += sum(op.other_requests for op in lineage.ops.values())
        assert leaks == 0, (status.nodes, lineage)
        assert status.dedup_scope == "tenant"  # not opted into sharing by the operator

        # another tenant's id answers exactly as a missing one, without a lookup
        errors = set()
        for target in (wf_b, f"b_wf-{uuid.uuid4().hex[:16]}", "a_wf-missing"):
            with pytest.raises(GatewayError) as info:
                await a.call("status", {"workflow_id": target})
            errors.add((info.value.code, str(info.value).replace(target, "ID")))
        assert len(errors) == 1

        # a record naming a blob cannot be loaded as an adapter: only train nodes adapt
        probe = raw_spec(
            [
                {"name": "m", "op": "map", "fn": "field.set", "inputs": ["src"],
                 "params": {"values": {"adapter": "0" * 64}}},
                {"name": "g", "op": "generate", "model": "tiny", "adapter": "m",
                 "inputs": ["src"]},
            ],
            [{"text": "x"}],
        )  # fmt: skip
        error = await refused(a, "submit", probe)
        assert "adapter 'm' is not a train node" in str(error)


async def test_console_and_metrics_show_tenants_only_their_own(auth_fabric: AuthFabric) -> None:
    """Metrics listened on 0.0.0.0 with no auth (tenant names, per-tenant dedup hits and
    costs); the console checked no Host header (DNS rebinding read every tenant)."""
    import base64

    import aiohttp

    from flowmesh.engine.console import ConsoleServer
    from flowmesh.engine.local import free_port
    from flowmesh.topics.config.creds import load_creds
    from flowmesh.topics.telemetry import exporter

    nonce = uuid.uuid4().hex[:8]
    async with (
        await TenantClient.from_creds(auth_fabric.creds("a"), timeout=60) as a,
        await TenantClient.from_creds(auth_fabric.creds("b"), timeout=60) as b,
        await auth_fabric.operator() as fm,
    ):
        await gateway_up(b)
        wf_a = await a.submit(spec("mine", nonce))
        wf_b = await b.submit(spec("theirs", nonce))
        await a.wait(wf_a, timeout=120)
        await b.wait(wf_b, timeout=120)

        console = ConsoleServer(fm.bus, fm.cas, interval_s=0.2)
        port = await console.start(0, host="127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        creds = load_creds(auth_fabric.creds("a"))
        login = base64.b64encode(f"{creds.user}:{creds.password}".encode()).decode()
        wrong = base64.b64encode(f"{creds.user}:not-it".encode()).decode()
        try:
            async with aiohttp.ClientSession() as http:

                async def get(path: str, **headers: str) -> tuple[int, Any]:
                    async with http.get(base + path, headers=headers) as resp:
                        return resp.status, await resp.json(content_type=None)

                # a rebinding page sends its own name: refused
                assert (await get("/api/workflows", Host=f"evil.example:{port}"))[0] == 403
                # on loopback with no token, the machine's own users are the operator
                status, rows = await get("/api/workflows")
                assert status == 200 and {wf_a, wf_b} <= {w["workflow_id"] for w in rows}
                # a tenant's login: its own workflows only, and b's lineage is "missing"
                auth = {"Authorization": f"Basic {login}"}
                status, rows = await get("/api/workflows", **auth)
                assert status == 200 and {w["tenant"] for w in rows} == {"a"}
                assert (await get(f"/api/workflows/{wf_b}/lineage", **auth))[0] == 404
                status, bill = await get("/api/cost", **auth)
                assert status == 200 and set(bill["tenants"]) <= {"a"}
                assert all(w.startswith("a_") for w in bill["workflows"])
                bad = {"Authorization": f"Basic {wrong}"}
                assert (await get("/api/workflows", **bad))[0] == 401
                # with an operator token set, nobody gets in without a credential
                assert console.access is not None
                console.access.token = "s3cret"
                assert (await get("/api/workflows"))[0] == 401
                op = {"Authorization": "Bearer s3cret"}
                assert (await get("/api/workflows", **op))[0] == 200
        finally:
            await console.stop()

        # metrics exposed beyond loopback need the token: a scrape without it is refused
        assert not exporter.is_loopback("0.0.0.0")
        mport = free_port()
        assert exporter.serve(mport, addr="0.0.0.0", token="t0k")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{mport}/metrics") as resp:
                assert resp.status == 401
            headers = {"Authorization": "Bearer t0k"}
            async with http.get(f"http://127.0.0.1:{mport}/metrics", headers=headers) as resp:
                assert resp.status == 200


# --- the small items ------------------------------------------------------------------


def test_auth_init_neither_follows_planted_links_nor_keeps_planted_passwords(
    tmp_path: Path,
) -> None:
    import os

    from click.testing import CliRunner

    from flowmesh.engine.cli import main as cli_main
    from flowmesh.topics.config.creds import load_creds

    out = tmp_path / "auth"
    (out / "creds").mkdir(parents=True)
    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched")
    (out / "creds" / "a.json").symlink_to(target)
    planted = out / "creds" / "fabric.json"
    planted.write_text('{"user": "fabric", "password": "known-to-the-attacker"}')
    os.chmod(planted, 0o600)
    res = CliRunner().invoke(cli_main, ["auth", "init", "--tenants", "a", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert target.read_text() == "untouched"
    a = out / "creds" / "a.json"
    assert not a.is_symlink() and a.stat().st_mode & 0o777 == 0o600
    assert load_creds(planted).password != "known-to-the-attacker"
    # a failed login costs the server the cheapest bcrypt (the passwords are random)
    assert '"$2b$04$' in (out / "nats-server.conf").read_text()


def test_up_with_a_config_refuses_an_unauthenticated_server_on_its_port(
    tmp_path: Path, nats_server: Any
) -> None:
    from flowmesh.engine.local import LocalFabric

    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=nats_server.url,
        cas_url=f"file://{tmp_path / 'cas'}",
        nats_config=tmp_path / "nats-server.conf",
    )
    with pytest.raises(RuntimeError, match="requires no credentials"):
        fabric.ensure_nats()


def test_operator_commands_use_flowmesh_creds_and_print_names_safely(
    auth_fabric: AuthFabric,
) -> None:
    import os

    from click.testing import CliRunner

    from flowmesh.engine.cli import main as cli_main

    async def submit() -> str:
        async with await auth_fabric.operator() as fm:
            hostile = msgspec.structs.replace(
                spec("x", uuid.uuid4().hex[:8]), name="n[/red]\x1b[2J\x1b]0;pwned\x07"
            )
            wf = await fm.submit(hostile)
            await fm.wait(wf, timeout=120)
            return wf

    wf = asyncio.run(submit())
    env = {**os.environ, "FLOWMESH_CREDS": str(auth_fabric.files.fabric)}
    runner = CliRunner()
    for args in (["status"], ["status", wf], ["top", "--once"]):
        res = runner.invoke(cli_main, [*args, "--nats", auth_fabric.url], env=env)
        assert res.exit_code == 0, (args, res.output)
        assert "\x1b" not in res.output and "\x07" not in res.output, args
    assert (
        "n[/red]" in runner.invoke(cli_main, ["status", "--nats", auth_fabric.url], env=env).output
    )


async def test_storage_errors_fail_clearly(tmp_path: Path) -> None:
    """A full disk left the workflow running with 0 operators forever: the planner
    caught only CASError, and the file backend raised OSError."""
    from flowmesh.topics.codec import canonical, sha256_hex
    from flowmesh.topics.store.cas import CAS, CASError, FileBackend

    cas = CAS(FileBackend(tmp_path))
    blob = b"some record"
    (tmp_path / sha256_hex(blob)[:2]).write_text("in the way")  # where its folder goes
    with pytest.raises(CASError, match="cannot store"):
        await cas.put(blob)
    in_the_way = tmp_path / sha256_hex(canonical({"text": "a"}))[:2]
    in_the_way.write_text("in the way")
    with pytest.raises(CASError, match="cannot store"):
        await cas.put_records([{"text": "a"}, {"text": "b"}] * 600)
    in_the_way.unlink()
    (tmp_path / sha256_hex(blob)[:2]).unlink()  # space is back: it stores again
    assert await cas.get(await cas.put(blob)) == blob
