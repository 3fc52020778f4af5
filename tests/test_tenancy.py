"""Tenancy and auth against a real nats-server that enforces the generated config, with a
real engine and worker logged in as the fabric user, and tenants that reach the fabric
only through the gateway (engine/gateway.py)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest
from click.testing import CliRunner

from flowmesh.engine.auth import AuthFiles
from flowmesh.engine.cli import main as cli_main
from flowmesh.engine.client import FlowMesh
from flowmesh.engine.lineage.reads import all_requests
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.spec import SpecError, parse_spec
from flowmesh.engine.tenant_client import GatewayError, NotFound, TenantClient
from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.config.creds import load_creds, url_with_creds
from flowmesh.topics.errors import Unavailable
from flowmesh.topics.messages import OpState, SubmitWorkflow, WorkflowSpec
from tests.conftest import PLUGINS, REPO, nats_server_binary

pytestmark = pytest.mark.slow


@dataclass
class AuthFabric:
    fabric: LocalFabric
    files: AuthFiles
    url: str

    def creds(self, tenant: str) -> Path:
        return self.files.tenants[tenant]

    async def operator(self) -> FlowMesh:
        """A fabric-side client: what the engine sees, to check what tenants cannot."""
        url = url_with_creds(self.url, load_creds(self.files.fabric))
        return await FlowMesh.connect(url, self.fabric.cas_url)


@pytest.fixture(scope="module")
def auth_fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthFabric]:
    """The whole engine in one process (`flowmesh engine`)."""
    yield from _auth_fabric(tmp_path_factory, planner_shards=0)


@pytest.fixture(scope="module")
def auth_fabric_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthFabric]:
    """The engine as `flowmesh up` runs it by default: a planner, the scheduler and the
    gateway in processes of their own."""
    yield from _auth_fabric(tmp_path_factory, planner_shards=1)


def _auth_fabric(
    tmp_path_factory: pytest.TempPathFactory, planner_shards: int
) -> Iterator[AuthFabric]:
    nats_server_binary()  # skips without one
    tmp = tmp_path_factory.mktemp("tenancy")
    url = f"nats://127.0.0.1:{free_port()}"
    out = tmp / "auth"
    res = CliRunner().invoke(
        cli_main, ["auth", "init", "--tenants", "a,b", "--out", str(out), "--url", url]
    )
    assert res.exit_code == 0, res.output
    files = AuthFiles(
        config=out / "nats-server.conf",
        fabric=out / "creds" / "fabric.json",
        tenants={t: out / "creds" / f"{t}.json" for t in ("a", "b")},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
        # the launcher starts nats-server with the generated config (as `flowmesh up
        # --nats-config` does) and hands the engine and worker the fabric credentials
        fabric = LocalFabric(
            data_dir=tmp / "data",
            nats_url=url,
            cas_url=f"file://{tmp / 'data' / 'cas'}",
            workers=1,
            worker_args=["--plugin", "fm_test_transforms", "--no-models"],
            engine_args=["--dead-after", "2"],
            creds=files.fabric,
            nats_config=files.config,
            planner_shards=planner_shards,
        )
        fabric.start()
        env = AuthFabric(fabric, files, url)
        try:

            async def workers_up() -> None:
                async with await env.operator() as fm:
                    for _ in range(600):
                        if await fm.workers():
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError("the worker did not register")
                # and the gateway: it may subscribe a moment after the worker registers
                async with await TenantClient.from_creds(env.creds("a")) as a:
                    for _ in range(600):
                        try:
                            await a.call("list")
                            return
                        except Unavailable:  # no engine serves the API yet
                            await asyncio.sleep(0.1)
                raise AssertionError("the gateway did not come up")

            asyncio.run(workers_up())
            yield env
        finally:
            fabric.stop()
            for log in sorted((fabric.log_dir or tmp).glob("*.log")):
                print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))


def spec(name: str, nonce: str, scope: str = "global", n: int = 6) -> WorkflowSpec:
    rows = [
        {"id": i, "text": f"{nonce} item {i}", "colour": "red" if i % 2 else "blue"}
        for i in range(n)
    ]
    upper = {"name": "upper", "op": "map", "fn": "text.upper", "input": "src"}
    count = {"name": "count", "op": "group", "input": "upper"}
    return parse_spec(
        {
            "name": name,
            "dedup_scope": scope,
            "datasets": {"src": {"records": rows}},
            "nodes": [
                {**upper, "params": {"field": "text"}},
                {**count, "params": {"by": "colour", "agg": "count"}},
            ],
        }
    )


async def ops_of(fm: FlowMesh, workflow_id: str) -> set[str]:
    status = await fm.status(workflow_id)
    assert status is not None
    keys: set[str] = set()
    for ns in status.nodes.values():
        assert ns.ops is not None
        keys.update(await fm.cas.get_manifest(ns.ops))
    return keys


# --- credentials -----------------------------------------------------------------------


def test_auth_init_keeps_issued_credentials_and_refuses_bad_names(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "auth"
    first = runner.invoke(cli_main, ["auth", "init", "--tenants", "a,b", "--out", str(out)])
    assert first.exit_code == 0, first.output
    a_before = load_creds(out / "creds" / "a.json")
    assert a_before.tenant == "a" and a_before.user == "tenant-a"
    # adding a tenant later must not invalidate what a and b already hold
    again = runner.invoke(cli_main, ["auth", "init", "--tenants", "c", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert load_creds(out / "creds" / "a.json") == a_before
    conf = (out / "nats-server.conf").read_text()
    assert all(f'"tenant-{t}"' in conf for t in "abc")
    assert a_before.password not in conf  # stored as a bcrypt hash only
    for path in [out / "nats-server.conf", *(out / "creds").glob("*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # "_" separates a tenant from its ids; dots would break subjects
    for bad in ("a_b", "a.b", "*"):
        res = runner.invoke(cli_main, ["auth", "init", "--tenants", bad, "--out", str(out)])
        assert res.exit_code == 2 and "tenant" in res.output


# --- through the gateway ----------------------------------------------------------------


async def test_tenant_submits_and_reads_its_own_workflow(auth_fabric: AuthFabric) -> None:
    nonce = uuid.uuid4().hex[:8]
    async with await TenantClient.from_creds(auth_fabric.creds("a")) as a:
        wf = await a.submit(spec("mine", nonce))
        assert wf.startswith("a_")
        status = await a.wait(wf, timeout=120)
        assert status.state == "completed" and status.tenant == "a"
        upper = await a.result(wf, "upper")
        assert [r["text"] for r in upper] == [f"{nonce} ITEM {i}".upper() for i in range(6)]
        counts = {r["colour"]: r["count"] for r in await a.result(wf, "count")}
        assert counts == {"red": 3, "blue": 3}
        assert wf in {s.workflow_id for s in await a.workflows()}
        lineage = await a.lineage(wf, "count")
        assert lineage.workflow_id == wf and lineage.ops
        cost = await a.cost()
        assert wf in cost.workflows and cost.tenants["a"].tenant == "a"
        # resubmitting its own id is idempotent, as with the internal SDK
        assert await a.submit(spec("mine", nonce), workflow_id=wf) == wf


async def test_tenant_cannot_see_another_tenants_workflow(auth_fabric: AuthFabric) -> None:
    nonce = uuid.uuid4().hex[:8]
    async with (
        await TenantClient.from_creds(auth_fabric.creds("a")) as a,
        await TenantClient.from_creds(auth_fabric.creds("b")) as b,
    ):
        wf = await a.submit(spec("secret", nonce))
        await a.wait(wf, timeout=120)
        assert await b.status(wf) is None
        errors = {}
        for which, target in (("a's", wf), ("missing", "a_wf-doesnotexist")):
            with pytest.raises(NotFound) as exc:
                await b.result(target, "upper")
            errors[which] = str(exc.value).replace(target, "ID")
            with pytest.raises(NotFound):
                await b.lineage(target)
        # an existing workflow of another tenant reads exactly like a missing one
        assert errors["a's"] == errors["missing"]
        assert wf not in {s.workflow_id for s in await b.workflows()}
        assert wf not in (await b.cost()).workflows

        # b cannot submit as a: the client refuses, and so does the gateway itself
        with pytest.raises(SpecError, match="tenant"):
            await b.submit(msgspec.structs.replace(spec("as-a", nonce), tenant="a"))
        raw = codec.to_builtins(spec("as-a", nonce))
        with pytest.raises(GatewayError, match="not yours") as refused:
            await b.call("submit", {"spec": {**raw, "tenant": "a"}})
        assert refused.value.code == "bad_request"
        # nor make the engine read a file on its side
        files = {**raw, "datasets": {"src": {"path": "/etc/passwd"}}}
        with pytest.raises(GatewayError, match="inline") as refused:
            await b.call("submit", {"spec": files})
        assert refused.value.code == "bad_request"


async def test_oversized_inline_dataset_gets_a_clear_error(auth_fabric: AuthFabric) -> None:
    rows = [{"text": "x" * 1000} for _ in range(1000)]
    big = msgspec.structs.replace(
        spec("big", "x"), datasets={"src": msgspec.structs.replace(
            spec("big", "x").datasets["src"], records=rows)}
    )  # fmt: skip
    async with await TenantClient.from_creds(auth_fabric.creds("a")) as a:
        with pytest.raises(SpecError, match="bytes"):
            await a.submit(big)
        # a client that skips that check gets the gateway's answer, not a dead engine
        with pytest.raises(GatewayError, match="limit") as exc:
            # under NATS's 1 MiB max_payload, over the gateway's limit
            small = codec.to_builtins(spec("s", "x"))
            await a.call("submit", {"spec": small, "pad": "y" * 800_000})
        assert exc.value.code == "too_large"
        assert isinstance(await a.workflows(), list)  # the gateway still answers


async def test_tenant_credentials_allow_only_its_own_api(auth_fabric: AuthFabric) -> None:
    creds = load_creds(auth_fabric.creds("a"))
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(
        auth_fabric.url,
        user=creds.user,
        password=creds.password,
        inbox_prefix=subjects.tenant_inbox_prefix("a"),
        error_cb=on_error,
    )

    async def refused(what: str) -> None:
        deadline = time.monotonic() + 10
        while not any(what in e for e in errors):
            assert time.monotonic() < deadline, f"no permission error for {what}: {errors}"
            await asyncio.sleep(0.05)

    stray = f"wf-stray-{uuid.uuid4().hex[:8]}"
    try:
        await nc.publish(subjects.api("b", "status"), b'{"workflow_id": "x"}')
        await refused('publish to "fm.api.b.status"')
        submit = SubmitWorkflow(workflow_id=stray, spec=spec("stray", stray), submitted_at=0.0)
        await nc.publish(subjects.SUBMIT, codec.encode(submit))
        await refused('publish to "fm.wf.submit"')
        for subject in (subjects.DONE, f"$KV.{streams.KV_WF}.>", "_INBOX.b.>"):
            await nc.subscribe(subject)
            await refused(f'subscription to "{subject.lower()}"')
        js = nc.jetstream(timeout=1.0)
        with pytest.raises(Exception):  # noqa: B017 - the server answers nothing at all
            await js.key_value(streams.KV_WF)
        await refused(f'publish to "$js.api.stream.info.kv_{streams.KV_WF}"')
        with pytest.raises(Exception):  # noqa: B017
            await js.object_store(streams.OBJ_CAS)
        await refused(f'publish to "$js.api.stream.info.obj_{streams.OBJ_CAS}"')
        assert nc.is_connected  # refused, not disconnected
    finally:
        await nc.close()
    # the refused submission never reached the submit stream
    async with await auth_fabric.operator() as fm:
        assert await fm.status(stray) is None
        info = await fm.bus.js.stream_info(streams.STREAM_SUBMIT)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await fm.bus.js.get_msg(streams.STREAM_SUBMIT, seq=seq)
            assert stray.encode() not in (msg.data or b"")

    # and a wrong password gets no connection at all
    with pytest.raises(Exception, match="Authorization"):
        await nats.connect(
            auth_fabric.url, user=creds.user, password="wrong", allow_reconnect=False
        )


async def test_tenant_dedup_scope_leaks_no_result_or_timing(auth_fabric: AuthFabric) -> None:
    nonce = uuid.uuid4().hex[:8]
    async with (
        await TenantClient.from_creds(auth_fabric.creds("a")) as a,
        await TenantClient.from_creds(auth_fabric.creds("b")) as b,
        await auth_fabric.operator() as fm,
    ):
        wf_a = await a.submit(spec("private", nonce, scope="tenant"))
        await a.wait(wf_a, timeout=120)
        # control: within a's own scope the same work IS shared, so a 0 below means
        # the scope, not a miss
        wf_a2 = await a.submit(spec("private", nonce, scope="tenant"))
        again = await a.wait(wf_a2, timeout=120)
        assert sum(n.reused for n in again.nodes.values()) == sum(
            n.total for n in again.nodes.values()
        )

        wf_b = await b.submit(spec("private", nonce, scope="tenant"))
        status_b = await b.wait(wf_b, timeout=120)
        assert all(n.reused == 0 for n in status_b.nodes.values()), status_b.nodes
        keys_a, keys_b = await ops_of(fm, wf_a), await ops_of(fm, wf_b)
        assert keys_a and keys_b and not keys_a & keys_b
        # computed afresh for b: every op started after b's submission, and b is the
        # only workflow that asked for it
        kv = await fm.bus.kv(streams.KV_OPS)
        for key in keys_b:
            state = codec.decode((await kv.get(key)).value or b"", OpState)
            assert state.state == "done" and state.workflow_id == wf_b
            assert state.started_at >= status_b.submitted_at
        requests = await all_requests(fm.bus)
        of_b = [r for r in requests if r.key in keys_b]
        assert {r.key for r in of_b} == keys_b
        assert all(r.tenant == "b" and r.role == "ran" for r in of_b), of_b
        # same answer, different (private) provenance
        assert await b.result(wf_b, "count") == await a.result(wf_a, "count")


# --- the CLI ------------------------------------------------------------------------------


def test_cli_submit_status_result_as_a_tenant(auth_fabric: AuthFabric, tmp_path: Path) -> None:
    nonce = uuid.uuid4().hex[:8]
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(codec.to_builtins(spec("cli", nonce))))
    # FLOWMESH_NATS points nowhere: the credentials file says where the server is
    env = {**os.environ, "FLOWMESH_NATS": "nats://127.0.0.1:1"}

    def flowmesh(*args: str, tenant: str = "a") -> subprocess.CompletedProcess[str]:
        creds = str(auth_fabric.creds(tenant))
        return subprocess.run(
            [sys.executable, "-m", "flowmesh.engine.cli", *args, "--tenant-creds", creds],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    sub = flowmesh("submit", str(path))
    assert sub.returncode == 0, sub.stderr
    wf = sub.stdout.strip().splitlines()[-1]
    assert wf.startswith("a_")
    st = flowmesh("status", wf, "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["state"] == "completed"
    res = flowmesh("result", wf, "upper")
    assert res.returncode == 0, res.stderr
    texts = [json.loads(line)["text"] for line in res.stdout.splitlines()]
    assert texts == [f"{nonce} ITEM {i}".upper() for i in range(6)]
    # b's credentials: a's workflow does not exist
    other = flowmesh("status", wf, tenant="b")
    assert other.returncode == 1 and "no workflow" in other.stderr
