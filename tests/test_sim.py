"""The simulator (loadgen/sim): deterministic, dedups by content, survives preemption, and
drives the real scheduling policy."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowmesh.engine.scheduler.fleet import Fleet, load_fleet
from flowmesh.engine.scheduler.policy import Policy, PolicyConfig, load_policy_config
from flowmesh.loadgen.cli import main
from flowmesh.loadgen.sim.metrics import PolicyResult, comparison, simulate
from flowmesh.loadgen.sim.workload import Workload, expand, instances, load_workload, parse_workload

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "workloads" / "smoke.yaml"
POLICIES = ("isolated-dedicated", "isolated-lean", "shared-fifo", "reference", "flowmesh")


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(REPO / "configs" / "fleet" / "default.yaml")


@pytest.fixture(scope="module")
def config() -> PolicyConfig:
    return load_policy_config(REPO / "configs" / "scheduler" / "default.yaml")


@pytest.fixture(scope="module")
def smoke() -> Workload:
    return load_workload(SMOKE)


def run_all(wl: Workload, fleet: Fleet, config: PolicyConfig) -> dict[str, PolicyResult]:
    return {p: simulate(wl, fleet, config, p) for p in POLICIES}


def doc(wl: Workload, results: dict[str, PolicyResult]) -> str:
    d = comparison(wl, list(results.values()), {})
    d.pop("timing")  # wall clock
    return json.dumps(d, sort_keys=True)


def test_deterministic_for_a_seed(smoke: Workload, fleet: Fleet, config: PolicyConfig) -> None:
    wl = smoke.with_overrides(preempt_rate_per_h=20.0)  # the kill stream too
    first = doc(wl, run_all(wl, fleet, config))
    assert doc(wl, run_all(wl, fleet, config)) == first
    other = wl.with_overrides(seed=wl.seed + 1)
    assert doc(other, run_all(other, fleet, config)) != first


def test_flowmesh_dedups_and_baselines_run_everything(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    r = run_all(smoke, fleet, config)
    fm = r["flowmesh"]
    assert fm.completed == fm.workflows > 0
    assert fm.ops_executed < fm.ops_requested
    assert fm.dedup_hits == fm.ops_requested - fm.ops_executed > 0
    for name in POLICIES[:-1]:
        assert r[name].ops_executed == r[name].ops_requested == fm.ops_requested
        assert r[name].dedup_hits == 0


def test_every_workflow_completes_under_preemption(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    wl = smoke.with_overrides(preempt_rate_per_h=120.0)
    for name, res in run_all(wl, fleet, config).items():
        assert res.completed == res.workflows, name
        assert res.preemptions >= 3, name
    # lost batches are replayed, and the replayed work still lands
    fm = simulate(wl, fleet, config, "flowmesh")
    fifo = simulate(wl, fleet, config, "shared-fifo")
    assert fm.replayed_ops + fifo.replayed_ops > 0
    assert fifo.ops_executed == fifo.ops_requested


def test_flowmesh_costs_no_more_than_isolated_with_overlap(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    fm = simulate(smoke, fleet, config, "flowmesh")
    iso = simulate(smoke, fleet, config, "isolated")
    assert fm.cost_usd <= iso.cost_usd
    assert fm.energy_kwh <= iso.energy_kwh


def test_flowmesh_goes_through_the_engine_policy(
    smoke: Workload, fleet: Fleet, config: PolicyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0, "batches": 0}
    real = Policy.decide_groups

    def counting(self: Policy, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        calls["batches"] += len(out)
        return out

    monkeypatch.setattr(Policy, "decide_groups", counting)
    fm = simulate(smoke, fleet, config, "flowmesh")
    assert calls["n"] > 0
    assert calls["batches"] == fm.batches  # every batch it ran, the Policy chose
    calls["n"] = 0
    simulate(smoke, fleet, config, "shared-fifo")
    assert calls["n"] == 0


def test_keys_are_content_identities(smoke: Workload) -> None:
    insts = instances(smoke)
    a, b = (next(i for i in insts if i.tenant == t) for t in ("acme", "bravo"))
    ra, rb = expand(smoke, a), expand(smoke, b)
    gen_a = {op.key for op in ra.stages[0].ops}
    gen_b = {op.key for op in rb.stages[0].ops}
    # sequential draws: both first rounds share the pool's first records
    assert gen_a & gen_b
    # the private train step never matches another workflow's
    assert not {op.key for op in ra.stages[3].ops} & {op.key for op in rb.stages[3].ops}
    # tenant scope salts every key
    tenants = tuple(replace(t, dedup_scope="tenant") for t in smoke.tenants)
    salted = replace(smoke, tenants=tenants)
    sa, sb = expand(salted, a), expand(salted, b)
    assert not {op.key for op in sa.ops} & {op.key for op in sb.ops}
    assert [op.content for op in sa.ops] == [op.content for op in ra.ops]


def test_tenant_scope_shares_nothing_across_tenants(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    tenants = tuple(replace(t, dedup_scope="tenant") for t in smoke.tenants)
    fm = simulate(replace(smoke, tenants=tenants), fleet, config, "flowmesh")
    assert fm.completed == fm.workflows
    assert fm.ops_executed == fm.ops_requested


def test_invalid_workload_is_reported() -> None:
    with pytest.raises(ValueError, match="no dataset/earlier stage"):
        parse_workload(
            {
                "fleet": {"h100": 1},
                "datasets": {"d": {"records": 1}},
                "templates": {"t": [{"name": "g", "kind": "generate", "input": "nope"}]},
                "tenants": [{"name": "x"}],
            }
        )


def test_cli_sim_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["sim", "--workload", str(SMOKE), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "cost reduction vs best baseline" in res.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["policies"]) == set(POLICIES)
    # each ratio is against the baseline that does best on that metric
    cheapest = min(POLICIES[:-1], key=lambda n: data["policies"][n]["cost_usd"])
    strongest = data["ratios_vs_strongest_baseline"]
    assert strongest["against"]["cost_reduction_x"] == cheapest
    assert strongest[cheapest]["cost_reduction_x"] == 1.0
    for name in POLICIES[:-1]:
        assert strongest[name]["cost_reduction_x"] <= 1.0
    assert data["ratios_vs"]["isolated-dedicated"]["isolated-dedicated"]["cost_reduction_x"] == 1.0
    assert (out / "cost_energy.png").stat().st_size > 0
    assert (out / "latency_cdf.png").stat().st_size > 0


def test_flowmesh_offers_busy_workers_to_the_policy_with_hold(
    smoke: Workload, fleet: Fleet, config: PolicyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With hold_s, busy workers expected to free within it come with the time the
    scheduler expects them to free (its own estimate, never in the past)."""
    seen = {"busy": 0, "overdue": 0}
    real = Policy.decide_groups

    def spying(self: Policy, groups: Any, workers: Any, now: float, *a: Any, **k: Any) -> Any:
        for w in workers:
            if w.free_slots == 0 and w.busy_until is not None:
                seen["busy"] += 1
                seen["overdue"] += w.busy_until < now
        return real(self, groups, workers, now, *a, **k)

    monkeypatch.setattr(Policy, "decide_groups", spying)
    fm = simulate(smoke, fleet, replace(config, hold_s=30.0), "flowmesh")
    assert fm.completed == fm.workflows
    assert seen["busy"] > 0 and seen["overdue"] == 0
    seen.update(busy=0)
    simulate(smoke, fleet, replace(config, hold_s=0.0), "flowmesh")
    assert seen["busy"] == 0  # no hold: busy workers are not offered


def test_forecast_release_frees_idle_gpus_sooner_and_loses_no_work(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    """Forecast release (and cold-start-aware scale-up) change only when workers come and
    go: every workflow completes, under preemption too, and idle GPU time shrinks when
    the accepted workflows have nothing left for the idle workers."""
    wl = smoke.with_overrides(preempt_rate_per_h=20.0)
    fixed = simulate(wl, fleet, replace(config, release="fixed", scale_up="backlog"), "flowmesh")
    rightsized = replace(config, release="forecast", scale_up="after-startup")
    fc = simulate(wl, fleet, rightsized, "flowmesh")
    for r in (fixed, fc):
        assert r.completed == r.workflows
        assert r.ops_requested == fixed.ops_requested
    assert fc.ops_executed + fc.dedup_hits == fc.ops_requested
    idle = [r.gpu_hours - r.gpu_busy_hours for r in (fixed, fc)]
    assert idle[1] < idle[0]


def test_forecast_release_never_keeps_a_worker_past_idle_release_s(
    fleet: Fleet, config: PolicyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept idle worker is re-checked, and released by its idle_release_s at the
    latest, however much work the forecast says is coming."""
    from flowmesh.engine.scheduler import elastic, rightsize
    from flowmesh.loadgen.sim import policies

    monkeypatch.setattr(elastic, "idle_to_keep", lambda *a: 10**6)  # always "keep"
    wl = load_workload(SMOKE)
    kept: list[float] = []
    real = policies.FlowMeshPolicy.keep_idle

    def spy(self: Any, sim: Any, w: Any, now: float) -> float | None:
        until = real(self, sim, w, now)
        kept.append((until if until is not None else now) - w.idle_since)
        return until

    monkeypatch.setattr(policies.FlowMeshPolicy, "keep_idle", spy)
    r = simulate(wl, fleet, replace(config, release="forecast"), "flowmesh")
    assert r.completed == r.workflows
    assert kept and max(kept) <= wl.settings.idle_release_s + 1e-6
    assert rightsize.idle_to_keep(1.0, 0, 1, 60.0) == 1  # the real one is untouched


def test_fair_share_reorders_tenants_without_costing_throughput(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    """The fairness term (log of due over got share) can outweigh a batch-size advantage:
    it changes which tenant goes first, not how much work the fleet gets through. On
    the smoke mix, with it on or off: every workflow completes, the same operators run,
    the makespan and cost stay within 5%."""
    on = simulate(smoke, fleet, config, "flowmesh")
    off = simulate(
        smoke, fleet, replace(config, weights=replace(config.weights, fairness=0.0)), "flowmesh"
    )
    assert on.completed == on.workflows == off.completed
    assert on.ops_executed == off.ops_executed
    assert on.makespan_s == pytest.approx(off.makespan_s, rel=0.05)
    assert on.cost_usd == pytest.approx(off.cost_usd, rel=0.05)


def test_isolated_lean_right_sizes_and_scales_to_zero(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    """isolated-lean packs a workflow's models onto as few GPUs as hold them (smoke's
    three 16 GB models: one 80 GB GPU), allocates workers only while the workflow has
    work for them, and picks the cheapest class when there is no deadline; with a tight
    deadline it picks a faster one. It bills less than one dedicated GPU per model."""
    from flowmesh.loadgen.sim.baselines import IsolatedLeanPolicy, pack_models
    from flowmesh.loadgen.sim.simulator import Simulation

    assert pack_models({"a": 16, "b": 16, "c": 16}, 80) == [["a", "b", "c"]]
    assert pack_models({"a": 16, "b": 16, "c": 16}, 24) == [["a"], ["b"], ["c"]]
    assert pack_models({"a": 40, "b": 30, "c": 8}, 48) == [["a", "c"], ["b"]]
    lean = simulate(smoke, fleet, config, "isolated-lean")
    dedicated = simulate(smoke, fleet, config, "isolated-dedicated")
    assert lean.completed == lean.workflows
    assert lean.cost_usd < dedicated.cost_usd
    pol = IsolatedLeanPolicy(fleet)
    Simulation(smoke, fleet, pol, config).run()
    loose = set(pol.choice.values())
    tight_wl = parse_workload(
        {**yaml_of(SMOKE), "defaults": {**yaml_of(SMOKE)["defaults"], "deadline_s": 45}}
    )
    pol_tight = IsolatedLeanPolicy(fleet)
    Simulation(tight_wl, fleet, pol_tight, config).run()
    tight = set(pol_tight.choice.values())
    price = {n: c.price_per_hour for n, c in fleet.classes.items()}
    assert max(price[c] for c in tight) > max(price[c] for c in loose)


def yaml_of(path: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def test_reference_dispatcher_merges_at_most_four_tasks_and_prefers_cached_workers(
    smoke: Workload, fleet: Fleet
) -> None:
    """The authors' dispatcher: best-fit score by lambda per category; a task merged with
    at most 3 siblings; among idle workers that fit, those holding the model first."""
    from flowmesh.loadgen.sim.baselines import MERGE_MAX, best_fit, lam

    assert MERGE_MAX == 4
    assert (lam("generate"), lam("train"), lam("group")) == (0.4, 0.8, 0.5)
    devs = [fleet.classes[c] for c in ("h100", "rtx4090")]
    # inference leans to cost (lambda 0.4): the cheaper 4090; training to capacity
    assert best_fit(devs, "generate", 0.0) == 1
    assert best_fit(devs, "train", 0.0) == 0
    r = simulate(
        smoke, fleet, load_policy_config(REPO / "configs/scheduler/default.yaml"), "reference"
    )
    assert r.completed == r.workflows
    assert r.dedup_hits == 0


def test_zipf_draws_onoff_arrivals_and_deadlines_parse() -> None:
    base = yaml_of(SMOKE)
    wl = parse_workload(
        {
            **base,
            "datasets": {
                "prompts": {"records": 8, "overlap": 1.0, "shared_pool": 400, "draw": "zipf"}
            },
            "defaults": {
                "arrivals": {
                    "process": "onoff",
                    "rate_per_h": 60,
                    "duration_s": 7200,
                    "on_s": 300,
                    "off_s": 900,
                    "peak": 4,
                },
                "deadline_s": 900,
            },
        }
    )
    insts = instances(wl)
    assert all(i.deadline_s == 900 for i in insts)
    # popular records recur across workflows far more than a uniform draw would make them
    seen = [r for i in insts for r in i.records["prompts"]]
    top = max(seen.count(r) for r in set(seen))
    assert top > len(insts) / 2
    # on/off: most arrivals inside the on windows (a quarter of the time)
    on = sum(1 for i in insts if (i.arrival % 1200) < 300)
    assert on > 0.75 * len(insts)


def test_each_lever_switch_changes_what_flowmesh_does(fleet: Fleet, config: PolicyConfig) -> None:
    """The ablation's switches (workload `levers:`, `--levers-off`) each turn one lever
    off and nothing else: dedup off runs every duplicated operator; batching off keeps
    each batch to one workflow (more, smaller batches); packing off holds one model per
    GPU (a model it comes back to is loaded again); heterogeneity off rents only
    `isolated.gpu` (here a class full flowmesh does not pick); release off keeps idle
    GPUs their idle_release_s. Every workflow completes in each."""
    from flowmesh.loadgen.sim.policies import one_gpu_class

    raw = yaml_of(SMOKE)
    raw_together = [{"name": n} for n in ("a", "b", "c")]  # all at once
    together = parse_workload({**raw, "tenants": raw_together})
    one_gpu = parse_workload({**raw, "fleet": {"h100": 1, "cpu-amx": 1}})

    def pair(wl: Workload, lever: str) -> tuple[PolicyResult, PolicyResult]:
        on = simulate(wl, fleet, config, "flowmesh")
        off = simulate(wl.with_overrides(levers_off=[lever]), fleet, config, "flowmesh")
        assert on.completed == on.workflows == off.completed
        assert on.ops_requested == off.ops_requested
        return on, off

    on, off = pair(together, "dedup")
    assert on.ops_executed < off.ops_executed == off.ops_requested
    on, off = pair(together, "batching")
    assert off.batches > on.batches and off.mean_gpu_batch_size < on.mean_gpu_batch_size
    assert off.ops_executed == on.ops_executed  # dedup still on
    on, off = pair(one_gpu, "packing")
    assert off.model_loads > on.model_loads
    on = simulate(together, fleet, config, "flowmesh")
    used = {c for c, usd in on.cost_by_class.items() if usd > 0 and c != "cpu-amx"}
    rent = next(c for c in ("h100", "l40s") if c not in used)  # a class full flowmesh skips
    wl = parse_workload({**raw, "tenants": raw_together, "isolated": {"gpu": rent}})
    off = simulate(wl.with_overrides(levers_off=["heterogeneity"]), fleet, config, "flowmesh")
    assert off.completed == off.workflows
    assert {c for c, usd in off.cost_by_class.items() if usd > 0 and c != "cpu-amx"} == {rent}
    assert one_gpu_class(fleet, wl.settings) == {rent: 4, "cpu-amx": 1}
    on, off = pair(together, "release")
    assert off.gpu_hours - off.gpu_busy_hours > on.gpu_hours - on.gpu_busy_hours
    with pytest.raises(ValueError, match="unknown levers"):
        together.with_overrides(levers_off=["magic"])
    assert parse_workload({**raw, "levers": {"dedup": False}}).settings.levers.off() == ("dedup",)
    with pytest.raises(ValueError, match="levers: unknown"):
        parse_workload({**raw, "levers": {"dedupe": True}})


def test_cpu_workers_are_prewarmed_for_a_cpu_stage_after_gpu_work(
    fleet: Fleet, config: PolicyConfig
) -> None:
    """The scale workload's `best` stage (a CPU `group` over each record's rewards)
    follows GPU scoring. Started only once its operators were ready, the CPU workers'
    cold start held the GPUs done with scoring idle behind it; pre-warmed for the work
    soon ready (the `prewarm` lever), they are up when it comes: less idle GPU time, a
    smaller bill, a shorter p95."""
    from flowmesh.loadgen.sim.bench import scale_workload

    wl = scale_workload(50, 50_000, seed=0)
    on = simulate(wl, fleet, config, "flowmesh")
    off = simulate(wl.with_overrides(levers_off=["prewarm"]), fleet, config, "flowmesh")
    assert on.completed == on.workflows == off.completed
    assert on.ops_executed == off.ops_executed
    assert on.gpu_hours - on.gpu_busy_hours < off.gpu_hours - off.gpu_busy_hours
    assert on.cost_usd < off.cost_usd and on.latency_p95_s < off.latency_p95_s


def test_floor_prices_the_unique_work_below_every_policy(
    smoke: Workload, fleet: Fleet, config: PolicyConfig
) -> None:
    """The bound analysis: the floor counts the operators flowmesh's dedup leaves, and
    no policy's bill or energy is under it; buying the fastest class costs at least as
    much as the cheapest."""
    from flowmesh.loadgen.sim.bound import floor

    f = floor(smoke, fleet, config.ref_model_gb)
    r = run_all(smoke, fleet, config)
    assert f.requested_ops == r["flowmesh"].ops_requested
    assert f.unique_ops == r["flowmesh"].ops_executed < f.requested_ops
    for res in r.values():
        assert f.cost_usd < res.cost_usd and f.energy_kwh < res.energy_kwh
    assert f.fastest_cost_usd >= f.cost_usd > 0


def test_cli_sweep_ablates_and_prints_the_floor() -> None:
    res = CliRunner().invoke(
        main,
        ["sweep", "--workload", str(SMOKE), "--seeds", "1", "--ablate"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "what the mix allows at best" in res.output
    for lever in ("dedup", "batching", "packing", "heterogeneity", "release"):
        assert lever in res.output


def test_a_lingering_group_on_an_empty_pool_starts_when_its_linger_ends(
    fleet: Fleet, config: PolicyConfig
) -> None:
    """linger_s holds a partial batch back from a new worker too; with no worker
    allocated nothing else wakes the simulator, so the group must not wait for the next
    unrelated event (here a workflow 300 s later): the first workflow finishes in about
    its own run time."""
    assert config.linger_s > 0
    raw = yaml_of(SMOKE)
    wl = parse_workload(
        {
            **raw,
            "tenants": [
                {"name": "a", "arrivals": {"count": 1}},
                {"name": "b", "arrivals": {"count": 1, "start_s": 300}},
            ],
        }
    )
    r = simulate(wl, fleet, config, "flowmesh")
    assert r.completed == r.workflows == 2
    assert r.latencies_s[0] < 200


def test_forecast_release_keeps_the_warm_minimum_only_while_it_can_be_needed(
    fleet: Fleet, config: PolicyConfig
) -> None:
    """The workload's warm minimum (a CPU worker here) is kept by `release: fixed` for
    the whole run; the forecast release keeps it while accepted workflows have work for
    its pool or workflows arrive once per cold start or more, so between two workflows
    an hour apart it goes, and comes back when the next one arrives (every workflow
    completes, its select not waiting on a cold start more than the fixed pool's)."""
    assert config.release == "forecast"
    raw = yaml_of(SMOKE)
    wl = parse_workload(
        {
            **raw,
            "autoscale": {"target_backlog_s": 60, "min_workers": {"cpu-amx": 1}},
            "tenants": [{"name": "a", "arrivals": {"count": 2, "rate_per_h": 1}}],
        }
    )
    fc = simulate(wl, fleet, config, "flowmesh")
    fixed = simulate(wl, fleet, replace(config, release="fixed"), "flowmesh")
    assert fc.completed == fixed.completed == 2
    assert fixed.cpu_hours * 3600 >= fixed.makespan_s  # warm from start to end
    assert fc.cpu_hours < fixed.cpu_hours / 4
    assert fc.latency_p95_s <= fixed.latency_p95_s * 1.05
