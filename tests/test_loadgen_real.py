"""`loadgen run` and `loadgen overhead`: the CI smoke versions of the real benchmarks.

They run the CLI as a user does (a subprocess), on real nats-servers, engines, worker
processes and a local Ray, and check what a user reads off the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowmesh.engine.spec import SpecError
from flowmesh.loadgen.real.results import ModeResult, WorkflowResult, output_mismatches
from flowmesh.loadgen.real.workload import load_real_workload

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "workloads" / "real-smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def loadgen(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    proc = subprocess.run(
        [sys.executable, "-m", "flowmesh.loadgen.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_workload_overlap_is_what_the_yaml_says(tmp_path: Path) -> None:
    wl = load_real_workload(SMOKE, records=10, overlap=0.5)
    a, b = (s.spec.datasets["data"].records or [] for s in wl.submissions)
    assert len(a) == len(b) == 10
    shared = {r["prompt"] for r in a} & {r["prompt"] for r in b}
    assert len(shared) == 5  # the shared pool is as large as the shared part: all of it
    none = load_real_workload(SMOKE, records=10, overlap=0.0)
    a, b = (s.spec.datasets["data"].records or [] for s in none.submissions)
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in b}


def test_workload_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="overlap"):
        load_real_workload(SMOKE, overlap=1.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("template: answer", "template: nope"))
    with pytest.raises(SpecError, match="unknown template 'nope'"):
        load_real_workload(bad)


def test_outputs_that_differ_between_modes_are_named() -> None:
    def mode(name: str, digest: str) -> ModeResult:
        wr = WorkflowResult("wf-1", "acme", 0.0, "completed", 1.0, output_digest=digest)
        return ModeResult(name, 1, [wr], 1, 1, 1.0, 0.0, 0.0, 1.0, 0.0)

    assert output_mismatches([mode("fabric", "ab" * 32), mode("isolated", "ab" * 32)]) == []
    assert output_mismatches([mode("fabric", "ab" * 32), mode("ray", "")]) == []
    (line,) = output_mismatches([mode("fabric", "ab" * 32), mode("isolated-lean", "cd" * 32)])
    assert line.startswith("wf-1: isolated-lean cdcd") and "fabric abab" in line


@pytest.mark.slow
def test_run_smoke_fabric_isolated_ray(tmp_path: Path) -> None:
    out = tmp_path / "run"
    loadgen("run", "--workload", str(SMOKE), "--out", str(out), timeout=500)
    doc = json.loads((out / "results.json").read_text())
    modes = doc["modes"]
    assert set(modes) == {"fabric", "isolated-lean", "isolated", "ray"}
    for m in modes.values():
        assert m["completed"] == m["workflows"] == 2
        assert m["worker_seconds"] > 0 and m["usd"] > 0 and m["energy_j"] > 0
        assert 0 < m["p50_s"] <= m["p95_s"]
        assert all(w["state"] == "completed" for w in m["per_workflow"])
    fab, iso, ray = modes["fabric"], modes["isolated"], modes["ray"]
    lean = modes["isolated-lean"]
    # lean: each tenant's workers started on demand and counted with their start-up
    assert lean["ops_executed"] == iso["ops_executed"] and lean["worker_cpu_s"] > 0
    # greedy results: the same bytes whichever way they ran (the run fails otherwise)
    digests = {
        m: {w["workflow_id"]: w["output_digest"] for w in modes[m]["per_workflow"]}
        for m in ("fabric", "isolated-lean", "isolated")
    }
    assert all(digests["fabric"].values())
    assert digests["fabric"] == digests["isolated-lean"] == digests["isolated"]
    # the same work was asked for everywhere; only the fabric ran the shared part once
    assert fab["ops_requested"] == iso["ops_requested"] == ray["ops_requested"]
    assert iso["ops_executed"] == iso["ops_requested"] == ray["ops_executed"]
    assert fab["ops_executed"] < iso["ops_executed"]
    # each workflow's bill: its split of what the fleet spent, so they add up
    # (and the fleet's overhead, warm-up and waiting for a core, billed to no one)
    billed = sum(w["device_seconds"] for w in fab["per_workflow"])
    assert billed + fab["overhead_s"] == pytest.approx(fab["worker_seconds"], rel=1e-6)
    assert fab["overhead_s"] > 0  # the worker's first generate batch was warmed up
    md = (out / "results.md").read_text()
    assert "| metric | fabric | isolated-lean | isolated | ray |" in md
    assert "| results identical to fabric | yes | yes | yes | - |" in md
    assert "worker CPU-seconds isolated-lean / mode" in md
    assert "worker-seconds isolated / mode" in md
    assert "worker CPU-seconds isolated / mode" in md
    for m in (fab, iso):
        assert m["worker_cpu_s"] > 0
    for png in ("latency.png", "work.png"):
        assert (out / png).read_bytes().startswith(PNG)


@pytest.mark.slow
def test_run_on_kafka_gives_the_same_results(tmp_path: Path) -> None:
    """`loadgen run --bus kafka`: each fabric's streams on a Kafka broker of its own; the
    modes compare as on NATS, with the same greedy results."""
    out = tmp_path / "run"
    loadgen(
        "run", "--workload", str(SMOKE), "--out", str(out), "--modes", "fabric,isolated-lean",
        "--bus", "kafka", "--no-plots", timeout=500,
    )  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    modes = doc["modes"]
    for m in modes.values():
        assert m["completed"] == m["workflows"] == 2
    digests = [
        {w["workflow_id"]: w["output_digest"] for w in m["per_workflow"]} for m in modes.values()
    ]
    assert all(digests[0].values()) and digests[0] == digests[1]
    assert modes["fabric"]["ops_executed"] < modes["isolated-lean"]["ops_executed"]
    # every fabric's engine and workers ran their streams on Kafka, each beside its broker
    started = [
        json.loads(line)
        for log in out.rglob("logs/*.log")
        for line in log.read_text().splitlines()
        if '"engine started"' in line or '"worker started"' in line
    ]
    assert started and {s["bus"] for s in started} == {"kafka"}
    assert len(list(out.rglob("logs/tansu.log"))) == 3  # the fabric, and a tenant's each


@pytest.mark.slow
def test_overhead_smoke(tmp_path: Path) -> None:
    out = tmp_path / "overhead"
    loadgen("overhead", "--ops", "500", "--workers", "1", "--out", str(out), timeout=300)
    s = json.loads((out / "overhead.json").read_text())
    assert s["ops"] == 500
    for key in ("raw_ops_per_s", "fabric_ops_per_s", "ray_ops_per_s"):
        assert s[key] > 0
    assert s["fabric_over_raw"] == pytest.approx(s["fabric_ops_per_s"] / s["raw_ops_per_s"])
    assert "| raw JetStream publish + pull/ack |" in (out / "overhead.md").read_text()
    assert (out / "overhead.png").read_bytes().startswith(PNG)


def test_isolated_mode_runs_as_many_workers_as_fabric(tmp_path: Path) -> None:
    """Both modes get the workload's workers: isolated splits them over the tenants
    (the first ones one more), and refuses fewer workers than tenants."""
    from dataclasses import replace

    from flowmesh.loadgen.real.fabric_modes import plan_groups

    wl = load_real_workload(SMOKE)
    wl3 = replace(wl, workers=3)
    fab = plan_groups(wl3, "fabric", tmp_path)
    iso = plan_groups(wl3, "isolated", tmp_path)
    assert sum(g.fabric.workers for g in fab) == sum(g.fabric.workers for g in iso) == 3
    assert [g.fabric.workers for g in iso] == [2, 1]
    with pytest.raises(ValueError, match="a worker per tenant"):
        plan_groups(replace(wl, workers=1), "isolated", tmp_path)


def test_worker_cpu_seconds_come_from_the_kernel() -> None:
    """CPU time, not wall time: a process that sleeps uses almost none, one that
    computes uses about what it computed."""
    from flowmesh.loadgen.real.cputime import cpu_seconds

    burn = (
        "import sys, time\nt = time.process_time()\n"
        "while time.process_time() - t < {}: pass\n"
        "print('done', flush=True)\ntime.sleep(5)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", burn.format(s)], stdout=subprocess.PIPE, text=True)
        for s in (0.0, 1.0)
    ]
    try:
        for p in procs:  # both have done their work and sleep now
            assert p.stdout is not None and p.stdout.readline().strip() == "done"
        idle, busy = (cpu_seconds(p.pid) for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert idle < 0.5  # the interpreter's start-up only
    assert busy >= 1.0 and busy > idle + 0.8
    assert cpu_seconds(2**22 + 12345) != cpu_seconds(2**22 + 12345)  # gone: nan


def test_the_large_scenarios_stall_is_counted_only_while_the_big_one_runs() -> None:
    """`loadgen large` samples progress until the last small workflow ends; a big one
    done at 18 s and sampled done until 30 s did not stall for 12 s."""
    from flowmesh.loadgen.real.large import LargeResult

    result = LargeResult(records=100, dataset_bytes=0, workers=2)
    result.progress = [(2.0, 0, 100), (4.0, 0, 100), (5.0, 0, 100), (7.0, 40, 100)]
    result.progress += [(t, 100, 100) for t in (8.0, 10.0, 20.0, 30.0)]
    assert result.max_stall_s() == 3.0  # 2.0 -> 5.0, the done count unchanged
