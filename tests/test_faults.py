"""Fault injection at scale: SIGKILL storms against a running multi-tenant fabric.

Real nats-server, real engine and worker processes (tests/conftest.py `make_fabric`).
While several tenants' workflows run, workers are SIGKILLed over and over, each while it
holds a batch where possible, and restarted so capacity stays; the engine is SIGKILLed
and restarted once too. Afterwards the fabric's invariants (README: "How work flows, and
why nothing is lost") are checked from the bus's own records:

* every workflow completes, with every operator done (none lost);
* every operator was committed once: its fm_ops KV history (kept for this test, see
  `keep_op_history`) has exactly one transition out of `pending`, and the completion
  stream announces one commit per key;
* results equal what the transforms compute on the input (no fault changed a result);
* cost: each operator's one execution cost is split among exactly the workflows that
  asked for it, so the charges add up to what the fleet spent, nobody twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.cost import cost_report
from flowmesh.engine.lineage.reads import all_requests
from flowmesh.engine.local import LocalFabric
from flowmesh.engine.spec import parse_spec
from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.messages import DoneBatch, OpState, WorkflowStatus
from tests.conftest import connect

KILLS_WANTED = int(os.environ.get("FM_FAULT_KILLS", "24"))
KILL_EVERY_S = 2.0
MIN_WORKER_AGE_S = 4.0  # a restarted worker gets to finish something before it dies again
RECORDS = 16
SHARED = 6  # records every tenant's dataset has in common (dedup across tenants)
TENANTS = ["acme", "globex", "initech"]
DELAY = 0.03  # test.slow_upper's sleep per record: batches are still running when killed


def dataset(tenant: str, wave: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "q": f"shared q {i}", "a": f"shared a {i}", "topic": f"t{i % 3}"}
        if i < SHARED
        else {"id": i, "q": f"{tenant} q {i} w{wave}", "a": f"a {i}", "topic": f"t{i % 3}"}
        for i in range(RECORDS)
    ]


def workflow(tenant: str, wave: int, scope: str) -> dict[str, Any]:
    return {
        "name": f"storm-{tenant}-{wave}-{scope}",
        "tenant": tenant,
        "dedup_scope": scope,
        "datasets": {"d": {"records": dataset(tenant, wave)}},
        "nodes": [
            {
                "name": "up_q",
                "op": "map",
                "fn": "test.slow_upper",
                "input": "d",
                "params": {"field": "q", "delay": DELAY},
            },
            {
                "name": "up_a",
                "op": "map",
                "fn": "test.slow_upper",
                "input": "up_q",
                "params": {"field": "a", "delay": DELAY},
            },
            {"name": "per_topic", "op": "group", "input": "up_a", "params": {"by": "topic"}},
        ],
    }


def expected(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """What the workflow must produce, computed here (the transforms are pure)."""
    up_a = [{**r, "q": r["q"].upper(), "a": r["a"].upper()} for r in records]
    counts = Counter(r["topic"] for r in records)
    return {"up_a": up_a, "per_topic": [{"topic": t, "count": counts[t]} for t in sorted(counts)]}


@dataclass
class Storm:
    fabric: LocalFabric
    fm: FlowMesh
    rng: random.Random
    born: dict[int, float] = field(default_factory=dict)  # worker pid -> start time
    kills: int = 0
    kills_holding_batch: int = 0
    engine_kills: int = 0

    def live_workers(self) -> list[tuple[int, str]]:
        return [
            (i, wid)
            for i, (p, wid) in enumerate(
                zip(self.fabric.worker_procs, self.fabric.worker_ids, strict=True)
            )
            if p.poll() is None
        ]

    async def holding(self) -> set[str]:
        """Workers with an assignment in hand (unacked on their assign subject)."""
        counts = await self.fm.bus.transport.assigned_counts()
        return {subjects.worker_of_assign_subject(s) for s, n in counts.items() if n}

    async def kill_one(self) -> bool:
        now = time.monotonic()
        candidates = [
            (i, wid)
            for i, wid in self.live_workers()
            if now - self.born.get(self.fabric.worker_procs[i].pid, now) >= MIN_WORKER_AGE_S
        ]
        if not candidates:
            return False
        mid_batch: list[tuple[int, str]] = []
        for _ in range(5):  # wait a moment for a batch to be in hand: kill mid-batch
            busy = await self.holding()
            mid_batch = [c for c in candidates if c[1] in busy]
            if mid_batch:
                break
            await asyncio.sleep(0.2)
        i, _ = self.rng.choice(mid_batch or candidates)
        proc = self.fabric.worker_procs[i]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.kills += 1
        self.kills_holding_batch += bool(mid_batch)
        self.born[self.fabric.start_worker().pid] = time.monotonic()
        return True

    def kill_engine(self) -> None:
        proc = self.fabric.engine_proc
        assert proc is not None and proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.engine_kills += 1
        self.fabric.start_engine()


async def keep_op_history(nats_url: str) -> None:
    """Create fm_ops before any component does, keeping 64 revisions per key instead of
    the one production keeps. Only retention differs: create-if-absent and
    compare-and-set behave the same, and every transition stays readable afterwards."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().create_key_value(
            KeyValueConfig(bucket=streams.KV_OPS, history=64, storage=StorageType.FILE)
        )
    finally:
        await nc.close()


async def read_completions(fm: FlowMesh) -> list[bytes]:
    """Every completion message, oldest first, from whichever bus carries them (the
    storm is over: none comes for a few seconds after the last)."""
    replay = await fm.bus.transport.replay(subjects.DONE)
    out: list[bytes] = []
    try:
        while True:
            try:
                out += [r.data for r in await replay.fetch(256, timeout=3.0)]
            except TimeoutError:
                return out
    finally:
        await replay.unsubscribe()


async def read_stream(fm: FlowMesh, subject: str, stream: str) -> list[tuple[str, bytes]]:
    """Every message of a stream, oldest first: (subject, data)."""
    js = fm.bus.js
    total = (await js.stream_info(stream)).state.messages
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    out: list[tuple[str, bytes]] = []
    try:
        while len(out) < total:
            msg = await sub.next_msg(timeout=10.0)
            out.append((msg.subject, msg.data))
    finally:
        await sub.unsubscribe()
    return out


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_sigkill_storm_loses_nothing_commits_once_and_bills_once(
    make_fabric: Callable[..., LocalFabric], nats_url: str
) -> None:
    await keep_op_history(nats_url)
    fabric = make_fabric(workers=3)
    fm = await connect(fabric, 3)
    seed = int(os.environ.get("FM_FAULT_SEED", random.randrange(1 << 30)))
    print(f"\nfault storm seed {seed} (FM_FAULT_SEED to replay the same choices)")
    storm = Storm(fabric, fm, random.Random(seed))
    for p in fabric.worker_procs:
        storm.born[p.pid] = time.monotonic()

    inputs: dict[str, list[dict[str, Any]]] = {}  # workflow id -> its records
    waves = 0

    async def submit_wave() -> None:
        nonlocal waves
        for tenant in TENANTS:
            # global scope shares work across tenants and waves; workflow scope runs
            # everything again for itself (a second, independent execution of each op)
            for scope in ("global", "workflow"):
                spec = parse_spec(workflow(tenant, waves, scope))
                wf = await fm.submit(spec, workflow_id=f"storm-{uuid.uuid4().hex[:10]}")
                inputs[wf] = dataset(tenant, waves)
        waves += 1

    async def running() -> int:
        states = [await fm.status(wf) for wf in inputs]
        return sum(s is None or s.state == "running" for s in states)

    started = time.monotonic()
    await submit_wave()
    # the storm: a kill every KILL_EVERY_S; a new wave whenever half a wave is left, so
    # the workers are never idle, until enough kills landed; the engine dies once, halfway
    while storm.kills < KILLS_WANTED:
        await asyncio.sleep(KILL_EVERY_S)
        if await running() <= len(TENANTS):
            await submit_wave()
        await storm.kill_one()
        if storm.kills == KILLS_WANTED // 2 and not storm.engine_kills:
            storm.kill_engine()
    storm_s = time.monotonic() - started

    statuses: dict[str, WorkflowStatus] = {}
    for wf in inputs:
        statuses[wf] = await fm.wait(wf, timeout=150)
    total_s = time.monotonic() - started

    # --- every workflow complete, with the right results -----------------------------
    n_ops_expected = 0
    asked: dict[str, set[str]] = defaultdict(set)  # op key -> workflows whose nodes use it
    for wf, status in statuses.items():
        assert status.state == "completed", (wf, status.error)
        want = expected(inputs[wf])
        for node, rows in want.items():
            assert await fm.result(wf, node) == rows, (wf, node)
        for name, node_status in status.nodes.items():
            assert node_status.complete and node_status.failed == 0, (wf, name)
            assert node_status.ops is not None
            keys = await fm.cas.get_manifest(node_status.ops)
            n_ops_expected += len(keys)
            for key in keys:
                asked[key].add(wf)
        assert status.nodes["up_a"].n_outputs == RECORDS

    # --- every operator committed exactly once ---------------------------------------
    history: dict[str, list[OpState]] = defaultdict(list)
    for subject, data in await read_stream(fm, f"$KV.{streams.KV_OPS}.>", f"KV_{streams.KV_OPS}"):
        if data:  # delete markers carry no value; nothing deletes here
            history[subject.split(".", 2)[2]].append(codec.decode(data, OpState))
    lost = [k for k in asked if not history[k] or history[k][-1].state != "done"]
    double = {
        k: [s.state for s in h]
        for k, h in history.items()
        if sum(s.state != "pending" for s in h) != 1 or h[-1].state == "pending"
    }
    commits: dict[str, set[tuple[float, str]]] = defaultdict(set)
    for data in await read_completions(fm):
        for done in codec.decode(data, DoneBatch).done:
            commits[done.key].add((done.ended_at, done.worker))
    announced_twice = {k: v for k, v in commits.items() if len(v) != 1}

    # --- each operator's cost charged once, split among exactly who asked -------------
    report = await cost_report(fm.bus)
    requests: dict[str, set[str]] = defaultdict(set)
    for r in await all_requests(fm.bus):
        requests[r.key].add(r.workflow_id)
    spent = sum(h[-1].cost_usd for k, h in history.items() if k in asked)
    charged_by_tenant = sum(b.paid_usd for b in report.tenants.values())
    charged_by_workflow = sum(b.paid_usd for b in report.workflows.values())
    reexecuted = sum(h[-1].attempts > 1 for k, h in history.items() if k in asked)

    print(
        f"fault storm: {storm.kills} worker kills ({storm.kills_holding_batch} holding a "
        f"batch), {storm.engine_kills} engine kill, {len(inputs)} workflows of "
        f"{len(TENANTS)} tenants in {waves} waves, {len(asked)} operators "
        f"({n_ops_expected} requested), {reexecuted} delivered more than once; "
        f"lost={len(lost)} double_commits={len(double)} "
        f"double_announced={len(announced_twice)}; "
        f"spent ${spent:.8f} charged ${charged_by_tenant:.8f}; "
        f"storm {storm_s:.0f}s, all done {total_s:.0f}s"
    )
    assert storm.kills >= KILLS_WANTED and storm.engine_kills == 1
    assert reexecuted > 0, "no kill interrupted any work: the storm tested nothing"
    assert not lost, lost[:5]
    assert not double, list(double.items())[:5]
    assert not announced_twice, list(announced_twice.items())[:5]
    assert set(history) == set(asked), "operators nobody asked for, or asked for and absent"
    # who is charged for an operator is exactly who asked for it, once each
    assert {k: requests[k] for k in asked} == dict(asked)
    assert report.operators == len(asked)
    assert report.total_usd == pytest.approx(spent, rel=1e-9)
    assert charged_by_tenant == pytest.approx(spent, rel=1e-9)
    assert charged_by_workflow == pytest.approx(spent, rel=1e-9)
    for wf, bill in report.workflows.items():
        assert bill.ops == len([k for k, wfs in asked.items() if wf in wfs])

    # the fabric is still whole: the engine and the live workers run
    assert fabric.engine_proc is not None and fabric.engine_proc.poll() is None
    assert len(storm.live_workers()) == 3
    await fm.close()
