"""Reliability on a real nats-server with real engine and worker processes: poison input
is retried then failed with its traceback, a paused worker loses its lease and its late
commit changes nothing, bad messages on every consumed subject are dead-lettered, and a
kill -9 of nats-server mid-run does not stop the run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from flowmesh.engine import cache
from flowmesh.engine.client import FlowMesh, WorkflowFailed
from flowmesh.engine.cost import cost_report
from flowmesh.engine.planner import max_attempts_from_env
from flowmesh.topics import codec, streams, subjects
from flowmesh.topics.messages import DeadLetter, DoneBatch, OpState, WorkflowSpec
from tests.conftest import MakeFabric, NatsServer, connect
from tests.workflows import map_then_count

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def rows(n: int, bad: int | None = None) -> list[dict[str, Any]]:
    return [{"id": i, "text": "bad" if i == bad else f"item {i}"} for i in range(n)]


def map_spec(name: str, data: list[dict[str, Any]], fn: str, **params: Any) -> WorkflowSpec:
    return map_then_count(name, data, fn, node="m", count=None, **params)


def upper(data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "text": r["text"].upper()} for r in data]


def executions(count_file: Path) -> Counter[str]:
    """Executions per record text, across every worker process."""
    if not count_file.exists():
        return Counter()
    lines = [json.loads(line) for line in count_file.read_text().splitlines()]
    return Counter(line["record"]["text"] for line in lines)


async def op_entries(fm: FlowMesh) -> dict[str, tuple[int, OpState]]:
    return {
        key: (revision, codec.decode(value, OpState))
        for key, value, revision in await fm.bus.kv_items(streams.KV_OPS)
    }


async def stream_messages(fm: FlowMesh, subject: str, stream: str) -> list[bytes]:
    """Every message of a stream, oldest first."""
    total = (await fm.bus.js.stream_info(stream)).state.messages
    sub = await fm.bus.js.subscribe(
        subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    out: list[bytes] = []
    try:
        while len(out) < total:
            out.append((await sub.next_msg(timeout=10.0)).data)
    finally:
        await sub.unsubscribe()
    return out


async def dead_letters(fm: FlowMesh) -> list[DeadLetter]:
    sub = await fm.bus.js.pull_subscribe(subjects.DLQ_ALL, stream=streams.STREAM_DLQ)
    out: list[DeadLetter] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=1.0)
            except TimeoutError:
                return out
            for m in msgs:
                out.append(codec.decode(m.data, DeadLetter))
                await m.ack()
    finally:
        await sub.unsubscribe()


def flowmesh_cli(fabric_nats: str, fabric_cas: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLOWMESH_NATS=fabric_nats, FLOWMESH_CAS=fabric_cas)
    return subprocess.run(
        [sys.executable, "-m", "flowmesh.engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


# --- poison input -----------------------------------------------------------------------


async def test_poison_record_is_retried_then_fails_with_traceback_others_unaffected(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "executions.jsonl"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))
    fabric = make_fabric(workers=2)
    poisoned = rows(6, bad=3)
    clean = [{"id": i, "text": f"other {i}"} for i in range(20)]
    async with await connect(fabric, 2) as fm:
        bad_wf = await fm.submit(map_spec("poisoned", poisoned, "test.fail_on", bad="bad"))
        good_wf = await fm.submit(map_spec("clean", clean, "test.fail_on", bad="bad"))
        with pytest.raises(WorkflowFailed) as failed:
            await fm.wait(bad_wf, timeout=120)
        good = await fm.wait(good_wf, timeout=120)
        assert await fm.result(good_wf, "m") == upper(clean)
        entries = await op_entries(fm)

        status = failed.value.status
        assert status.state == "failed" and good.state == "completed"
        failure = status.failure
        assert failure is not None
        assert failure.node == "m" and failure.attempts == 3
        assert "poison record 'bad'" in failure.error
        # the user's own frame, not just the message
        assert "fm_test_transforms.py" in failure.traceback
        assert 'raise ValueError(f"poison record' in failure.traceback
        assert status.error is not None and failure.key[:12] in status.error
        assert "'m'" in status.error and "after 3 attempts" in status.error

        # retried: three executions of the poison record, one of each other record;
        # only the last failure was committed, as one entry
        runs = executions(count_file)
        assert runs["bad"] == 3
        assert all(runs[r["text"]] == 1 for r in poisoned + clean if r["text"] != "bad")
        committed = entries[failure.key][1]
        assert committed.state == "failed" and committed.attempts == 3
        assert "ValueError" in committed.traceback

        # what a user sees on the command line
        text = flowmesh_cli(fabric.nats_url, fabric.cas_url, "status", bad_wf)
        assert text.returncode == 0, text.stderr
        # the answer on stdout, whole (not cut at 80 columns when piped)
        assert failure.key in text.stdout and "3 attempt(s)" in text.stdout
        assert "poison record" in text.stdout and "Traceback" in text.stdout
        as_json = flowmesh_cli(fabric.nats_url, fabric.cas_url, "status", bad_wf, "--json")
        assert json.loads(as_json.stdout)["failure"]["key"] == failure.key

        # `cache invalidate --state failed` clears it so the next request runs it again
        cleared = await cache.invalidate(fm.bus, state="failed")
        assert failure.key in cleared
        assert failure.key not in await op_entries(fm)
    assert all(fabric.alive().values())


async def test_a_record_that_kills_its_worker_is_isolated_then_failed_others_unaffected(
    make_fabric: MakeFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no exception to retry: the worker process dies (os._exit) each time it runs the
    # record. It must not crash-loop the fleet forever, nor take its batch-mates down.
    # The limit is the engine's (the workers are not told): it travels with the operator
    monkeypatch.delenv("FLOWMESH_MAX_RECLAIMS", raising=False)
    fabric = make_fabric(workers=2, engine_args=("--max-reclaims", "3"))
    crashing = rows(8, bad=5)
    steady = rows(6)
    async with await connect(fabric, 2) as fm:
        bad_wf = await fm.submit(map_spec("crashing", crashing, "test.crash_on", bad="bad"))
        good_wf = await fm.submit(map_spec("steady", steady, "text.upper"))
        crashed: set[int] = set()

        async def supervise() -> None:
            # what `flowmesh up` or a Deployment does: keep two workers running
            while True:
                for proc in list(fabric.worker_procs):
                    if proc.poll() == 17 and proc.pid not in crashed:
                        crashed.add(proc.pid)
                        fabric.start_worker()
                await asyncio.sleep(0.2)

        keeper = asyncio.create_task(supervise())
        try:
            with pytest.raises(WorkflowFailed) as failed:
                await fm.wait(bad_wf, timeout=150)
            await fm.wait(good_wf, timeout=60)
        finally:
            keeper.cancel()
        assert await fm.result(good_wf, "m") == upper(steady)
        status = failed.value.status
        # the workflow fails when the record does; an innocent one re-queued behind it
        # on the worker it killed may still be running then
        assert status.nodes["m"].failed == 1 and 6 <= status.nodes["m"].done <= 7
        failure = status.failure
        assert failure is not None and "worker was lost 3 times" in failure.error
        # the seven innocent records of the crashing batch are committed, once each
        for _ in range(100):
            entries = await op_entries(fm)
            states = sorted(st.state for _, st in entries.values() if st.workflow_id == bad_wf)
            if "pending" not in states:
                break
            await asyncio.sleep(0.2)
        assert states == ["done"] * 7 + ["failed"]
        # the whole batch twice, then the record alone once; then it is not run again
        assert len(crashed) == 3


async def test_transient_failure_recovers_and_a_failed_key_reruns_for_a_new_workflow(
    make_fabric: MakeFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_file = tmp_path / "executions.jsonl"
    monkeypatch.setenv("FM_COUNT_FILE", str(count_file))
    fabric = make_fabric(workers=2)
    async with await connect(fabric, 2) as fm:
        # fails twice per record, then works: inside the default 3 attempts
        twice = rows(4)
        wf = await fm.submit(map_spec("flaky", twice, "test.fail_first", times=2))
        await fm.wait(wf, timeout=120)
        assert await fm.result(wf, "m") == upper(twice)
        assert set(executions(count_file).values()) == {3}
        states = [st for _, st in (await op_entries(fm)).values()]
        assert [st.attempts for st in states] == [3] * 4

        # fails three times: the first workflow fails; a later workflow asking for the
        # same key is not served the failure but runs it again, and it works
        thrice = [{"id": 0, "text": "third time unlucky"}]
        spec = map_spec("flakier", thrice, "test.fail_first", times=3)
        first = await fm.submit(spec)
        with pytest.raises(WorkflowFailed):
            await fm.wait(first, timeout=120)
        second = await fm.submit(spec)
        assert (await fm.wait(second, timeout=120)).state == "completed"
        assert await fm.result(second, "m") == upper(thrice)
        assert executions(count_file)["third time unlucky"] == 4
        first_status = await fm.status(first)
        assert first_status is not None and first_status.state == "failed"


def test_max_attempts_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWMESH_MAX_ATTEMPTS", raising=False)
    assert max_attempts_from_env() == 3
    monkeypatch.setenv("FLOWMESH_MAX_ATTEMPTS", "1")
    assert max_attempts_from_env() == 1
    for bad in ("0", "three"):
        monkeypatch.setenv("FLOWMESH_MAX_ATTEMPTS", bad)
        with pytest.raises(ValueError, match="FLOWMESH_MAX_ATTEMPTS"):
            max_attempts_from_env()


# --- stuck work -------------------------------------------------------------------------


async def test_stopped_worker_loses_its_lease_and_its_late_commit_changes_nothing(
    make_fabric: MakeFabric,
) -> None:
    fabric = make_fabric(workers=2)
    data = rows(30)
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(map_spec("paused", data, "test.slow_upper", delay=0.3))
        # the victim is the first worker given a batch (the records arrive as one ready
        # chunk: the policy may give them all to either worker)
        for _ in range(300):
            info = await fm.bus.js.stream_info(
                streams.STREAM_ASSIGN, subjects_filter=subjects.ASSIGN_ALL
            )
            held = info.state.subjects or {}
            got = [i for i, w in enumerate(fabric.worker_ids) if held.get(subjects.assign(w))]
            if got:
                index = got[0]
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no worker got a batch")
        victim_id, victim = fabric.worker_ids[index], fabric.worker_procs[index]
        await asyncio.sleep(0.1)  # inside its batch (0.3 s per record)
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            status = await fm.wait(wf, timeout=120)
            assert await fm.result(wf, "m") == upper(data)
            before = await op_entries(fm)
            bill = await cost_report(fm.bus)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        assert status.state == "completed"
        assert all(st.worker != victim_id for _, st in before.values())

        # the victim wakes up, finishes its stale batch and tries to commit it
        log = (fabric.log_dir or Path()) / f"worker-{index}.log"
        for _ in range(200):
            if '"assignment consumer gone; rejoining"' in log.read_text():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the resumed worker never noticed it lost its lease")
        for _ in range(200):  # its batch ends after it noticed (0.3 s per record)
            if '"commit lost to an earlier one"' in log.read_text():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the resumed worker's late commit was not refused")
        after = await op_entries(fm)
        assert after == before  # same revisions, same results, same worker and cost
        assert (await cost_report(fm.bus)).tenants == bill.tenants
        # its late completions (one message per batch) announce only what was committed
        announced = {
            (d.key, d.ended_at, d.worker)
            for data in await stream_messages(fm, subjects.DONE, streams.STREAM_DONE)
            for d in codec.decode(data, DoneBatch).done
        }
        assert announced == {(k, st.ended_at, st.worker) for k, (_, st) in before.items()}

        # and it is a worker again: it rejoined and takes new work
        for _ in range(100):
            if victim_id in {w.worker for w in await fm.workers()}:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the resumed worker did not re-register")
        again = await fm.submit(map_spec("after", rows(12), "test.slow_upper", delay=0.05))
        assert (await fm.wait(again, timeout=120)).state == "completed"
    engine_log = ((fabric.log_dir or Path()) / "engine.log").read_text()
    reclaims = [json.loads(ln) for ln in engine_log.splitlines() if '"worker reclaimed"' in ln]
    assert any(r["worker"] == victim_id and r["reason"] == "heartbeat lost" for r in reclaims)
    assert victim.poll() is None


# --- bad messages -----------------------------------------------------------------------


async def test_bad_messages_on_every_consumed_subject_are_dead_lettered(
    make_fabric: MakeFabric,
) -> None:
    fabric = make_fabric(workers=1)
    worker = fabric.worker_ids[0]
    huge = b'{"x": "' + b"a" * (streams.MAX_MESSAGE_BYTES + 10) + b'"}'
    garbage = b"\xff\x00 not msgpack or json"
    targets = [
        ("planner", subjects.SUBMIT),
        ("planner", subjects.DONE),
        ("scheduler", subjects.ready("cpu")),
        ("worker", subjects.assign(worker)),
    ]
    async with await connect(fabric, 1) as fm:
        for _, subject in targets:
            await fm.bus.js.publish(subject, garbage)
            await fm.bus.js.publish(subject, huge)
        # heartbeats are a KV bucket the scheduler watches
        workers_kv = await fm.bus.kv(streams.KV_WORKERS)
        await workers_kv.put("bogus", garbage)
        await workers_kv.put("bogus2", huge)

        expected = {
            *((c, s, "garbage") for c, s in targets),
            *((c, s, "too large") for c, s in targets),
            ("scheduler", f"$KV.{streams.KV_WORKERS}.bogus", "garbage"),
            ("scheduler", f"$KV.{streams.KV_WORKERS}.bogus2", "too large"),
        }
        found: set[tuple[str, str, str]] = set()
        letters: list[DeadLetter] = []
        for _ in range(30):
            letters += await dead_letters(fm)
            found = {(ltr.component, ltr.subject, kind_of(ltr.reason)) for ltr in letters}
            if expected <= found:
                break
            await asyncio.sleep(0.5)
        assert expected <= found, sorted(expected - found)
        assert all(ltr.reason for ltr in letters)
        assert all(ltr.size == len(huge) for ltr in letters if "too large" in ltr.reason)

        # every shared component still serves
        data = rows(5)
        wf = await fm.submit(map_spec("after-garbage", data, "text.upper"))
        await fm.wait(wf, timeout=60)
        assert await fm.result(wf, "m") == upper(data)
    assert all(fabric.alive().values())


def kind_of(reason: str) -> str:
    return "too large" if "too large" in reason else "garbage"


# --- nats-server restart ------------------------------------------------------------------


async def test_nats_server_killed_mid_run_and_restarted_run_completes(
    make_fabric: MakeFabric, nats_server: NatsServer
) -> None:
    fabric = make_fabric(workers=2)
    data = rows(40)
    spec = map_then_count(
        "through-restart", data, "test.slow_upper", node="m", count="n", by="id", delay=0.1
    )
    async with await connect(fabric, 2) as fm:
        wf = await fm.submit(spec)
        for _ in range(300):
            st = await fm.status(wf)
            if st and st.nodes["m"].done > 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the run never started")
        nats_server.kill()  # SIGKILL: no clean shutdown of the store
        # down for longer than the engine's --dead-after (2 s): no heartbeat gets
        # through meanwhile, and no worker may be taken for dead for that
        await asyncio.sleep(3.0)
        nats_server.start()
        status = await fm.wait(wf, timeout=150)
        assert status.state == "completed"
        assert await fm.result(wf, "m") == upper(data)
        assert len(await fm.result(wf, "n")) == 40
        # consumers are back: a workflow submitted after the restart runs too
        later = await fm.submit(map_spec("later", rows(6), "text.upper"))
        assert (await fm.wait(later, timeout=60)).state == "completed"
    assert all(fabric.alive().values())
    engine_log = ((fabric.log_dir or Path()) / "engine.log").read_text()
    assert '"worker reclaimed"' not in engine_log
