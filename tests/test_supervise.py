"""Supervision: `flowmesh up` restarts what dies, stops everything on SIGTERM or Ctrl-C, and
a restarted planner never shows less progress than it had.

Real processes throughout: the backoff test drives real short-lived children with a clock
of its own (the seam it is about); the others run `flowmesh up` or a LocalFabric on a
real nats-server and kill their processes with SIGKILL.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.shards import shard_of
from flowmesh.engine.supervise import Supervisor
from tests.conftest import PLUGINS, REPO, MakeFabric, connect, nats_server_binary
from tests.workflows import map_then_count


def _exits(code: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])


def test_a_crash_loop_backs_off_exponentially_and_a_stable_run_resets_it() -> None:
    now = [0.0]
    sup = Supervisor(base_s=1.0, max_s=4.0, stable_s=10.0, clock=lambda: now[0])
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        spawned.append(_exits(3))
        return spawned[-1]

    child = sup.watch("crasher", spawn)

    def died() -> None:
        child.proc.wait()

    delays = []
    for _ in range(4):
        died()
        assert sup.check() == []  # noticed: a restart is scheduled, not done
        assert child.restart_at is not None
        delays.append(child.restart_at - now[0])
        now[0] = child.restart_at - 0.01
        assert sup.check() == []  # not before its time
        now[0] = child.restart_at
        assert sup.check() == ["crasher"]
    assert delays == [1.0, 2.0, 4.0, 4.0]  # doubling, capped at max_s
    assert child.restarts == 4 and len(spawned) == 5

    # a run longer than stable_s: the next exit is restarted after base_s again
    now[0] += 11.0
    died()
    sup.check()
    assert child.restart_at == now[0] + 1.0


def test_a_running_child_is_left_alone_and_forget_stops_watching() -> None:
    sup = Supervisor(base_s=0.0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sup.adopt("sleeper", sleeper, lambda: _exits(0))
        assert sup.check() == []
        assert sup.children["sleeper"].proc is sleeper
        sup.forget("sleeper")
        sleeper.kill()
        sleeper.wait()
        assert sup.check() == []
    finally:
        sleeper.kill()


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc; ppid is field 4 of /proc/PID/stat)."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _workers_of(pid: int) -> dict[str, int]:
    """`up`'s worker processes: their --id -> pid."""
    out = {}
    for child in _children(pid):
        argv = _cmdline(child).split()
        if "flowmesh.workers.main" in argv and "--id" in argv:
            out[argv[argv.index("--id") + 1]] = child
    return out


async def _wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_up_restarts_a_killed_worker_and_sigterm_stops_everything(tmp_path: Path) -> None:
    nats_server_binary()  # skips without one
    nats_port, console_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowmesh.engine.cli",
            "up",
            *("--nats", nats_url, "--data-dir", str(tmp_path / "data")),
            *("--workers", "2", "--no-models", "--planner-shards", "2"),
            *("--metrics-port", "0", "--console-port", str(console_port)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await _wait_until("two workers", lambda: len(_workers_of(up.pid)) == 2, 60)
        fm = await FlowMesh.connect(nats_url, f"file://{tmp_path / 'data' / 'cas'}")
        try:
            await _wait_until_registered(fm, 2)
            before = _workers_of(up.pid)
            victim_id, victim = sorted(before.items())[0]
            os.kill(victim, signal.SIGKILL)
            await _wait_until(
                "a replacement worker",
                lambda: len(_workers_of(up.pid)) == 2 and victim_id not in _workers_of(up.pid),
                30,
            )
            assert up.poll() is None  # `up` lives on
            rows = [{"text": f"r{i}", "colour": "red" if i % 2 else "blue"} for i in range(20)]
            wf = await fm.submit(map_then_count("after-kill", rows, "text.upper"))
            status = await fm.wait(wf, timeout=90)
            assert status.state == "completed", status.error
            assert await fm.result(wf, "up") == [{**r, "text": r["text"].upper()} for r in rows]
        finally:
            await fm.close()

        family = _children(up.pid)
        assert len(family) >= 7  # nats, 2 planners, scheduler, gateway, 2 workers
        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if up.poll() is None:
            up.kill()
    print(f"`up` stopped in {took:.1f}s")
    assert up.returncode == 0, out.decode()[-2000:]
    assert b"stopped" in out
    assert not [p for p in family if _alive(p)], [_cmdline(p) for p in family if _alive(p)]
    assert not _listening(nats_port) and not _listening(console_port)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_killed_up_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL to `up` (or the OOM killer) stops nothing in order: its engine parts and
    workers see their parent gone and stop by themselves, and the kernel stops the
    nats-server it started. Before, all of them ran on, holding the ports."""
    nats_server_binary()
    nats_port = free_port()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowmesh.engine.cli",
            "up",
            *("--nats", f"nats://127.0.0.1:{nats_port}", "--data-dir", str(tmp_path / "d")),
            *("--workers", "2", "--no-models", "--metrics-port", "0", "--console-port", "0"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    family: set[int] = set()
    try:
        await _wait_until("two workers", lambda: len(_workers_of(up.pid)) == 2, 60)
        family = _children(up.pid)
        assert any("nats-server" in _cmdline(p) for p in family)
        up.kill()
        up.wait()
        # the nats-server goes at once; the others stop as on SIGTERM (their last writes
        # to it bounded), or exit if still starting
        try:
            await _wait_until("its processes to stop", lambda: not any(map(_alive, family)), 60)
        except AssertionError:
            left = [_cmdline(p)[:160] for p in family if _alive(p)]
            raise AssertionError(f"still running: {left}") from None
    finally:
        for p in family:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    assert not _listening(nats_port)


async def _wait_until_registered(fm: FlowMesh, n: int) -> None:
    for _ in range(600):
        if len(await fm.workers()) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("workers did not register")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_ctrl_c_to_up_stops_everything_with_exit_0(tmp_path: Path) -> None:
    """Ctrl-C at a terminal: SIGINT to `up` (its children are in sessions of their own,
    so `up` stops them in order)."""
    nats_server_binary()
    nats_port = free_port()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowmesh.engine.cli",
            "up",
            *("--nats", f"nats://127.0.0.1:{nats_port}", "--data-dir", str(tmp_path / "d")),
            *("--workers", "1", "--no-models", "--metrics-port", "0", "--console-port", "0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await _wait_until("a worker", lambda: len(_workers_of(up.pid)) == 1, 60)
        family = _children(up.pid)
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, out.decode()[-2000:]
    assert not [p for p in family if _alive(p)]
    assert not _listening(nats_port)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_supervised_fabric_restarts_a_worker_killed_mid_batch(
    make_fabric: MakeFabric,
) -> None:
    fabric: LocalFabric = make_fabric(workers=2)
    fm = await connect(fabric, 2)
    try:
        rows = [{"text": f"r{i}", "colour": "red"} for i in range(40)]
        wf = await fm.submit(map_then_count("kill9", rows, "test.slow_upper", delay=0.1))
        await _progress(fm, wf, 4)
        victim = fabric.worker_procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        restarted: list[str] = []
        deadline = time.monotonic() + 90
        status = await fm.status(wf)
        while status is None or status.state == "running":
            assert time.monotonic() < deadline, "workflow did not complete"
            restarted += fabric.supervise()
            await asyncio.sleep(0.2)
            status = await fm.status(wf)
        assert restarted == ["worker-0"]
        assert fabric.worker_procs[0].pid != victim.pid and fabric.alive()["worker-0"]
        assert status.state == "completed", status.error
        assert await fm.result(wf, "count") == [{"colour": "red", "count": 40}]
    finally:
        await fm.close()


async def _progress(fm: FlowMesh, wf: str, done: int) -> None:
    for _ in range(600):
        st = await fm.status(wf)
        if st is not None and sum(n.done for n in st.nodes.values()) >= done:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no progress")


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_restarted_planner_never_reports_less_progress(make_fabric: MakeFabric) -> None:
    """Kill -9 the engine halfway through a wide workflow: while the new planner replays
    it, the status it writes never shows fewer operators done than before."""
    fabric: LocalFabric = make_fabric(workers=2)
    fm = await connect(fabric, 2)
    try:
        rows = [{"text": f"r{i}", "colour": "red"} for i in range(600)]
        wf = await fm.submit(map_then_count("wide", rows, "test.slow_upper", delay=0.002))
        await _progress(fm, wf, 250)
        engine = fabric.engine_proc
        assert engine is not None
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
        st = await fm.status(wf)
        assert st is not None
        seen = [sum(n.done for n in st.nodes.values())]
        fabric.start_engine()
        while st is not None and st.state == "running":
            await asyncio.sleep(0.02)
            st = await fm.status(wf)
            assert st is not None
            seen.append(sum(n.done for n in st.nodes.values()))
        assert st is not None and st.state == "completed", st and st.error
        drops = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
        print(f"progress after the kill: {seen[0]} -> {seen[-1]} in {len(seen)} reads")
        assert not drops, drops[:5]
    finally:
        await fm.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_dead_shard_stops_only_its_own_workflows(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two planner shards: while shard 0 is down, shard 1 plans and completes its own
    workflow (and leaves shard 0's alone); once restarted, shard 0 completes its own."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
    fabric = LocalFabric(
        data_dir=tmp_path / "data",
        nats_url=nats_url,
        cas_url=f"file://{tmp_path / 'data' / 'cas'}",
        workers=1,
        planner_shards=2,
        worker_args=["--plugin", "fm_test_transforms", "--no-models"],
    )
    fabric.start()
    try:
        fm = await connect(fabric, 1)
        down = fabric.planner_procs[0]
        os.kill(down.pid, signal.SIGKILL)
        down.wait()
        ids = {shard_of(wf, 2): wf for wf in (f"wf-{i}" for i in range(20))}
        rows = [{"text": f"r{i}", "colour": "red"} for i in range(6)]
        for shard in (0, 1):
            spec = map_then_count(f"shard{shard}", rows, "text.upper")
            await fm.submit(spec, workflow_id=ids[shard])
        done = await fm.wait(ids[1], timeout=60)
        assert done.state == "completed", done.error
        assert await fm.status(ids[0]) is None  # nobody planned it: its shard is down
        assert fabric.supervise() == [] and not fabric.alive()["planner-0"]  # backing off
        deadline = time.monotonic() + 10
        while "planner-0" not in fabric.supervise():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        late = await fm.wait(ids[0], timeout=60)
        assert late.state == "completed", late.error
        assert await fm.result(ids[0], "count") == [{"colour": "red", "count": 6}]
        await fm.close()
    finally:
        fabric.stop()
