"""The utility function and the policy round: pure, so tested without a bus (and the
live scheduler's use of what workers announce, against a real nats-server)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from flowmesh.engine.scheduler.fairness import FairShare, TenantPolicy
from flowmesh.engine.scheduler.fleet import LatencyEstimator, load_fleet, parse_fleet
from flowmesh.engine.scheduler.policy import (
    Policy,
    PolicyConfig,
    ReadyItem,
    WorkerState,
    parse_policy_config,
)
from flowmesh.engine.scheduler.utility import Weights, estimate, terms, utility

REPO = Path(__file__).resolve().parent.parent
REF = {"generate": {"fixed_s": 0.4, "per_item_s": 0.05, "max_batch": 32}}


def fleet_of(**classes: dict[str, Any]) -> Any:
    base = {"kind": "gpu", "watts_busy": 300, "memory_gb": 40, "load_gbps": 5}
    return parse_fleet(
        {
            "reference": REF,
            "ref_model_gb": {"generate": 10},
            "classes": {n: {**base, **c} for n, c in classes.items()},
        }
    )


def item(
    i: int,
    *,
    model: str | None = "m",
    tenant: str = "t",
    bkey: str = "b",
    ready_at: float = 0.0,
    wf: str | None = None,
    kind: str = "generate",
) -> ReadyItem:
    return ReadyItem(
        key=f"k{bkey}{i}",
        batch_key=bkey,
        kind=kind,
        executor="generate@1",
        model=model,
        model_gb=10.0 if model else 0.0,
        input_bytes=1000,
        tenant=tenant,
        workflow_id=wf or f"wf{i}",
        ready_at=ready_at,
    )


def score(**over: Any) -> float:
    args: dict[str, Any] = dict(
        n=16,
        fixed_s=0.4,
        per_item_s=0.05,
        size_factor=1.0,
        warm=True,
        model_gb=10.0,
        load_gbps=5.0,
        input_bytes=0.0,
        net_gbps=1.0,
        price_per_hour=2.0,
        watts_busy=300.0,
    )
    t_args: dict[str, Any] = dict(deficit=0.0, oldest_wait_s=0.0, priority=0.0)
    for k, v in over.items():
        (t_args if k in t_args else args)[k] = v
    est = estimate(**args)
    return float(
        utility(
            terms(args["n"], est, 10.0, 0.001, 1.0, weights=Weights(), aging_scale_s=60.0, **t_args)
        )
    )


def test_utility_is_monotonic_in_each_term() -> None:
    base = score()
    assert score(per_item_s=0.01) > base  # faster: more throughput
    assert score(price_per_hour=4.0) < base  # dearer
    assert score(watts_busy=600.0) < base  # hungrier
    assert score(warm=False) < base  # must load the model first
    assert score(input_bytes=1e9) < base  # must fetch data first
    assert score(deficit=0.3) > base  # the tenant is owed fleet time
    assert score(oldest_wait_s=30.0) > base  # it has waited
    assert score(priority=1.0) > base
    # and strictly monotonic along each axis, not just at one point
    waits = [score(oldest_wait_s=w) for w in (0, 10, 100, 1000)]
    assert waits == sorted(waits) and len(set(waits)) == 4


def test_cheaper_class_wins_when_speed_is_equal() -> None:
    fleet = fleet_of(dear={"price_per_hour": 3.0}, cheap={"price_per_hour": 1.0})
    workers = [WorkerState("w-dear", "dear", 1), WorkerState("w-cheap", "cheap", 1)]
    decisions = Policy(fleet).decide([item(i) for i in range(8)], workers, now=1.0)
    assert decisions[0].worker == "w-cheap"
    assert (
        decisions[0].terms["cost"]
        > Policy(fleet)
        .decide([item(i) for i in range(8)], [WorkerState("w-dear", "dear", 1)], now=1.0)[0]
        .terms["cost"]
    )


def test_warm_worker_wins_when_cost_is_equal() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    cold = WorkerState("cold", "gpu", 1)
    warm = WorkerState("warm", "gpu", 1, resident={"m": 10.0})
    decisions = Policy(fleet).decide([item(i) for i in range(4)], [cold, warm], now=1.0)
    assert decisions[0].worker == "warm" and decisions[0].load_model is None
    assert decisions[0].terms["locality"] == pytest.approx(0.0, abs=1e-3)  # inputs only


def test_compatible_operators_of_many_workflows_share_one_batch() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    items = [item(i, wf=f"wf{i % 8}", tenant=f"t{i % 4}") for i in range(32)]
    decisions = Policy(fleet).decide(items, [WorkerState("w", "gpu", 1)], now=1.0)
    assert len(decisions) == 1 and len(decisions[0].items) == 32
    assert len({i.workflow_id for i in decisions[0].items}) == 8


def test_batch_is_capped_by_the_class_and_by_the_worker() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    items = [item(i) for i in range(100)]
    [d] = Policy(fleet).decide(items, [WorkerState("w", "gpu", 1)], now=1.0)
    assert len(d.items) == 32  # the profile's max batch
    capped = WorkerState("w", "gpu", 1, batch_caps={"generate@1": 5})
    [d] = Policy(fleet).decide(items, [capped], now=1.0)
    assert len(d.items) == 5


def test_backlog_spreads_over_idle_workers_but_not_into_tiny_batches() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})

    def workers() -> list[WorkerState]:  # decide() takes their slots: fresh ones each time
        return [WorkerState(f"w{i}", "gpu", 1, resident={"m": 10.0}) for i in range(4)]

    ds = Policy(fleet).decide([item(i) for i in range(128)], workers(), now=1.0)
    assert sorted(len(d.items) for d in ds) == [32, 32, 32, 32]
    # with fixed 0.4 s and 0.05 s per item, a batch under 24 is mostly overhead
    ds = Policy(fleet).decide([item(i) for i in range(64)], workers(), now=1.0)
    assert sorted(len(d.items) for d in ds) == [16, 24, 24]
    # 8 operators would make batches of 2 on four workers; fixed cost dominates there
    ds = Policy(fleet).decide([item(i) for i in range(8)], workers(), now=1.0)
    assert len(ds) == 1 and len(ds[0].items) == 8


def test_memory_aware_placement_and_eviction() -> None:
    fleet = fleet_of(
        small={"price_per_hour": 0.5, "memory_gb": 8}, big={"price_per_hour": 3.0, "memory_gb": 24}
    )
    # the model (10 GB) does not fit the cheap 8 GB class: it must go to the big one
    ds = Policy(fleet).decide(
        [item(i) for i in range(4)],
        [WorkerState("s", "small", 1), WorkerState("b", "big", 1)],
        now=1.0,
    )
    assert [d.worker for d in ds] == ["b"]
    # a worker holding two 10 GB models must evict the least recently used for a third
    w = WorkerState("b", "big", 1, resident={"old": 10.0, "recent": 10.0})
    [d] = Policy(fleet).decide([item(i, model="new") for i in range(4)], [w], now=1.0)
    assert d.load_model == "new" and d.evict == ("old",)
    assert list(w.resident) == ["recent", "new"]


def test_nothing_starves_under_aging() -> None:
    """One slot per round; a fresh, more attractive batch arrives every round from a
    high-priority tenant. The old operator still runs after a bounded wait."""
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    cfg = PolicyConfig(tenants={"vip": TenantPolicy(priority=2.0)})
    policy = Policy(fleet, cfg)
    fair = FairShare(cfg.tenants)
    lonely = item(0, tenant="small", bkey="lonely", ready_at=0.0)
    for rnd in range(1000):
        now = rnd * 10.0
        fresh = [item(i, tenant="vip", bkey=f"r{rnd}", ready_at=now) for i in range(32)]
        ds = policy.decide(
            [lonely, *fresh], [WorkerState("w", "gpu", 1, resident={"m": 10})], now=now, fair=fair
        )
        assert len(ds) == 1
        if ds[0].items[0].key == lonely.key:
            break
    else:
        pytest.fail("the lonely operator starved")
    assert rnd > 0  # it did have to wait: the fresh batches were preferred at first


def test_fair_share_favours_the_tenant_that_got_less() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    fair = FairShare()
    fair.charge("hog", device_s=1000.0, cost_usd=1.0, now=0.0)
    items = [item(i, tenant="hog", bkey="h") for i in range(8)]
    items += [item(i, tenant="meek", bkey="m") for i in range(8)]
    [d] = Policy(fleet).decide(
        items, [WorkerState("w", "gpu", 1, resident={"m": 10})], now=1.0, fair=fair
    )
    assert d.items[0].tenant == "meek" and d.terms["fairness"] > 0


def test_small_tenant_is_served_before_a_big_backlog_that_had_the_fleet() -> None:
    """Weighted fair share under a backlog: a tenant with a backlog of 256-operator
    batches has had the only worker for a while; another tenant's 5 operators arrive.
    The next batch is the small tenant's, although it loses on throughput and cost
    (about 2.4 points): the fairness term outweighs the batch-size advantage."""
    fleet = load_fleet(REPO / "configs/fleet/default.yaml")
    cfg = PolicyConfig()
    policy = Policy(fleet, cfg)
    fair = FairShare(cfg.tenants)
    big = [replace_kind(item(i, tenant="big", bkey="big", model=None), "map") for i in range(4096)]
    worker = WorkerState("w", "cpu-amx", 1)
    now = 0.0
    for _ in range(3):  # the big tenant has the worker for a few rounds
        worker.free_slots = 1
        [d] = policy.decide(big, worker_list(worker), now, fair)
        assert d.items[0].tenant == "big" and len(d.items) == 256
        big = big[256:]
        now += d.seconds
    small = [
        replace_kind(item(i, tenant="small", bkey="small", model=None, ready_at=now), "map")
        for i in range(5)
    ]
    worker.free_slots = 1
    [d] = policy.decide([*big, *small], worker_list(worker), now + 0.5, fair)
    assert [it.tenant for it in d.items] == ["small"] * 5
    # what it had to outweigh: the big batch scores more on every other term
    terms_small = dict(d.terms)
    worker.free_slots = 1
    [d_big] = policy.decide(big, worker_list(worker), now + 0.5, FairShare())
    rest = ("throughput", "cost", "energy", "locality")
    assert sum(d_big.terms[t] for t in rest) - sum(terms_small[t] for t in rest) > 1.0
    assert terms_small["fairness"] > 2.0
    # with fairness off the backlog would have kept the worker
    worker.free_slots = 1
    off = Policy(fleet, PolicyConfig(weights=Weights(fairness=0.0)))
    [d_off] = off.decide([*big, *small], worker_list(worker), now + 0.5, fair)
    assert d_off.items[0].tenant == "big"


def replace_kind(it: ReadyItem, kind: str) -> ReadyItem:
    from dataclasses import replace

    return replace(it, kind=kind, executor=f"{kind}@1")


def worker_list(w: WorkerState) -> list[WorkerState]:
    return [w]


def test_over_budget_tenant_waits() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    cfg = PolicyConfig(tenants={"broke": TenantPolicy(budget_usd=0.5)})
    fair = FairShare(cfg.tenants)
    fair.charge("broke", 10.0, 0.6, now=0.0)
    ds = Policy(fleet, cfg).decide(
        [item(i, tenant="broke") for i in range(4)],
        [WorkerState("w", "gpu", 1)],
        now=1.0,
        fair=fair,
    )
    assert ds == []


def test_latency_estimator_learns_the_real_speed() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    est = LatencyEstimator(fleet)
    assert est.model("gpu", "generate") == fleet["gpu"].latency["generate"]
    # the device is really 3x slower than its profile says
    for n in [4, 8, 16, 32, 8, 16] * 5:
        est.observe("gpu", "generate", n, 3 * (0.4 + 0.05 * n))
    learned = est.model("gpu", "generate")
    assert learned is not None
    assert learned.seconds(16) == pytest.approx(3 * (0.4 + 0.05 * 16), rel=0.1)


def test_default_fleet_profile_loads() -> None:
    fleet = load_fleet(REPO / "configs" / "fleet" / "default.yaml")
    assert {"h100", "a100", "l40s", "rtx4090", "cpu-amx"} <= set(fleet.classes)
    assert fleet["h100"].latency["generate"].seconds(8) < fleet["rtx4090"].latency[
        "generate"
    ].seconds(8)
    assert not fleet["h100"].runs("map") and fleet["cpu-amx"].runs("map")


def test_speed_by_kind_scales_each_kind_and_places_work_by_it() -> None:
    """A class fast at decoding (bandwidth) but slow at training (tensor throughput),
    and one the other way round, at the same price: generate goes to the first, train
    to the second; one speed per class could not tell them apart."""
    ref = {
        "generate": {"fixed_s": 0.4, "per_item_s": 0.05, "max_batch": 32},
        "train": {"fixed_s": 1.5, "per_item_s": 0.05, "max_batch": 32},
    }
    base = {"kind": "gpu", "watts_busy": 300, "memory_gb": 40, "load_gbps": 5}
    fleet = parse_fleet(
        {
            "reference": ref,
            "ref_model_gb": {"generate": 10, "train": 10},
            "classes": {
                "wide": {**base, "price_per_hour": 1.0, "speed": 0.6,
                         "speed_by_kind": {"train": 0.2}},
                "dense": {**base, "price_per_hour": 1.0, "speed": 0.2,
                          "speed_by_kind": {"train": 0.6}},
            },
        }
    )  # fmt: skip
    assert fleet["wide"].latency["generate"].per_item_s == pytest.approx(0.05 / 0.6)
    assert fleet["wide"].latency["train"].fixed_s == pytest.approx(1.5 / 0.2)
    assert fleet["dense"].latency["train"].per_item_s == pytest.approx(0.05 / 0.6)
    policy = Policy(fleet, PolicyConfig(linger_s=0.0))
    for kind, where in (("generate", "wide"), ("train", "dense")):
        items = [item(i, kind=kind) for i in range(8)]
        workers = [WorkerState("w-wide", "wide", 1), WorkerState("w-dense", "dense", 1)]
        (first, *_) = policy.decide(items, workers, now=0.0)
        assert first.device_class == where, (kind, first.device_class)
    for bad, match in (({"train": 0}, "must be > 0"), ({"score": 1.0}, "no reference")):
        doc = {"reference": ref, "classes": {"x": {**base, "price_per_hour": 1.0,
                                                   "speed_by_kind": bad}}}  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_fleet(doc)


def test_cpu_takes_small_models_when_that_is_cheaper() -> None:
    fleet = load_fleet(REPO / "configs" / "fleet" / "default.yaml")

    def placed(model_gb: float) -> str:
        items = [
            ReadyItem(f"k{i}", "b", "generate", "generate@1", "m", model_gb, 1000, "t", "wf", 0.0)
            for i in range(16)
        ]
        workers = [WorkerState("gpu", "h100", 1), WorkerState("cpu", "cpu-amx", 1)]
        [d] = Policy(fleet).decide(items, workers, now=0.0)
        return d.worker

    assert placed(0.3) == "cpu"  # a 135M-parameter model: the CPU is nearly as fast, far cheaper
    assert placed(16.0) == "gpu"  # a 7B model: the CPU would take forever


def test_size_factor_matches_what_decide_applies() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0, "min_size_factor": 0.4})
    policy = Policy(fleet)
    assert policy.size_factor("generate", 20.0, "gpu") == pytest.approx(2.0)
    assert policy.size_factor("generate", 1.0, "gpu") == pytest.approx(0.4)  # the floor
    assert policy.size_factor("generate", 0.0, "gpu") == pytest.approx(1.0)  # no model
    [d] = policy.decide(
        [item(i, model="m") for i in range(8)],
        [WorkerState("w", "gpu", 1, resident={"m": 10.0})],
        now=0.0,
    )
    lat = fleet["gpu"].latency["generate"]
    assert d.seconds == pytest.approx(
        lat.seconds(8) * policy.size_factor("generate", 10.0, "gpu"), rel=1e-3
    )


def test_a_cold_worker_pays_its_startup_and_is_not_idle_capacity() -> None:
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    [d] = Policy(fleet).decide([item(i) for i in range(8)], [WorkerState("w", "gpu", 1)], now=0.0)
    [cold] = Policy(fleet).decide(
        [item(i) for i in range(8)], [WorkerState("w", "gpu", 1, startup_s=60.0)], now=0.0
    )
    assert cold.seconds == pytest.approx(d.seconds)  # on the device: the same batch
    assert cold.cost_usd == pytest.approx(d.cost_usd + 60.0 * 2.0 / 3600)  # billed from alloc
    assert cold.score < d.score
    # a warm idle worker beats a cold one of the same class
    ds = Policy(fleet).decide(
        [item(i) for i in range(8)],
        [WorkerState("cold", "gpu", 1, startup_s=60.0), WorkerState("idle", "gpu", 1)],
        now=0.0,
    )
    assert [d.worker for d in ds] == ["idle"]
    # four cold candidates are not four idle workers: no spreading into small batches
    cold4 = [WorkerState(f"c{i}", "gpu", 1, startup_s=60.0) for i in range(4)]
    ds = Policy(fleet).decide([item(i) for i in range(64)], cold4, now=0.0)
    assert sorted(len(d.items) for d in ds) == [32, 32]


def test_cold_fast_class_wins_a_backlog_it_will_serve() -> None:
    """The one-off startup and model load are shared by the batches a new worker is
    expected to run: for one batch the cheap slow class wins on them, for a backlog the
    class that is cheaper and faster per operator does."""
    fleet = fleet_of(
        fast={"price_per_hour": 2.0, "speed": 1.0}, slow={"price_per_hour": 1.2, "speed": 0.5}
    )

    def first(n_items: int) -> str:
        cands = [
            WorkerState("f", "fast", 1, startup_s=60.0),
            WorkerState("s", "slow", 1, startup_s=60.0),
        ]
        return Policy(fleet).decide([item(i) for i in range(n_items)], cands, now=0.0)[0].worker

    assert first(32) == "s"
    assert first(1024) == "f"


def test_hold_leaves_a_slow_worker_idle_when_a_fast_one_frees_soon() -> None:
    fleet = fleet_of(
        fast={"price_per_hour": 2.0, "speed": 1.0}, slow={"price_per_hour": 1.5, "speed": 0.3}
    )
    items = [item(i) for i in range(32)]

    def workers(busy_until: float | None) -> list[WorkerState]:
        return [
            WorkerState("slow", "slow", 1, resident={"m": 10.0}),
            WorkerState("fast", "fast", 0, resident={"m": 10.0}, busy_until=busy_until),
        ]

    held = PolicyConfig(hold_s=10.0)
    # the fast worker frees in 1 s and finishes the batch long before the slow one would
    assert Policy(fleet, held).decide(items, workers(1.0), now=0.0) == []
    # without hold (the default), or when it frees too late, the slow worker takes it
    assert [d.worker for d in Policy(fleet).decide(items, workers(1.0), now=0.0)] == ["slow"]
    assert [d.worker for d in Policy(fleet, held).decide(items, workers(30.0), now=0.0)] == ["slow"]
    # overdue (it should have freed by now): no telling when it will, nothing is held
    assert [d.worker for d in Policy(fleet, held).decide(items, workers(-1.0), now=0.0)] == ["slow"]
    # a backlog bigger than the fast worker's batch: the slow one takes the rest
    more = [item(i) for i in range(64)]
    ds = Policy(fleet, held).decide(more, workers(1.0), now=0.0)
    assert [d.worker for d in ds] == ["slow"] and len(ds[0].items) == 32


def test_hold_s_is_read_from_the_config() -> None:
    assert parse_policy_config({"hold_s": 7}).hold_s == 7.0
    assert parse_policy_config({}).hold_s == 0.0


def test_release_and_scale_up_modes_are_read_and_checked() -> None:
    cfg = parse_policy_config({"release": "forecast", "scale_up": "after-startup"})
    assert (cfg.release, cfg.scale_up) == ("forecast", "after-startup")
    assert (parse_policy_config({}).release, parse_policy_config({}).scale_up) == (
        "fixed",
        "backlog",
    )
    with pytest.raises(ValueError, match="release must be one of fixed, forecast"):
        parse_policy_config({"release": "sometimes"})
    with pytest.raises(ValueError, match="scale_up must be one of"):
        parse_policy_config({"scale_up": "lots"})
    with pytest.raises(ValueError, match="linger_s and hold_s must be >= 0"):
        parse_policy_config({"linger_s": -1})


def test_scale_up_counts_what_warm_workers_do_during_a_cold_start() -> None:
    from flowmesh.engine.scheduler.rightsize import scale_up

    # nothing allocated: the backlog alone sizes the pool (as before)
    assert scale_up(135.0, 0, 60.0, 60.0) == 3
    # one warm worker does 60 s of the 135 s while a new one starts: one more, not two
    assert scale_up(135.0, 1, 60.0, 60.0) == 1
    # the warm ones finish it before a new one would be up: none
    assert scale_up(100.0, 2, 60.0, 60.0) == 0
    # free starts (startup 0) fall back to backlog / target
    assert scale_up(135.0, 1, 0.0, 60.0) == 2
    assert scale_up(0.0, 0, 60.0, 60.0) == 0
    # more work never asks for fewer workers
    counts = [scale_up(b, 2, 60.0, 60.0) for b in range(0, 2000, 7)]
    assert counts == sorted(counts)


def test_idle_to_keep_is_the_work_busy_workers_cannot_absorb() -> None:
    from flowmesh.engine.scheduler.rightsize import idle_to_keep

    assert idle_to_keep(0.0, 0, 3, 60.0) == 0  # nothing left to do: release them all
    assert idle_to_keep(100.0, 2, 3, 60.0) == 0  # the two busy ones do it within 60 s
    assert idle_to_keep(200.0, 2, 3, 60.0) == 2  # 80 s more: two idle ones are needed
    assert idle_to_keep(10_000.0, 0, 3, 60.0) == 3  # never more than are idle
    assert idle_to_keep(10_000.0, 0, 0, 60.0) == 0


async def test_live_scheduler_packs_by_the_model_sizes_workers_announce(nats_url: str) -> None:
    """A worker announces what its models weigh (WorkerInfo.model_gb): the live scheduler
    places by that size, so a 40 GB model never goes to a 24 GB device, however cheap,
    where the old 1 GB assumption would have sent it."""
    import asyncio
    import time

    from flowmesh.engine.scheduler.live import Scheduler
    from flowmesh.topics import Bus, codec, streams, subjects
    from flowmesh.topics.messages import OpSpec, ReadyOp, WorkerInfo, chunks_of

    fleet = fleet_of(
        small={"memory_gb": 24, "price_per_hour": 0.2}, big={"memory_gb": 80, "price_per_hour": 2.0}
    )
    digest = "a" * 64
    # the premise: at the assumed 1 GB the cheap small device is the policy's pick
    one_gb = [replace_gb(item(0), 1.0)]
    small, big = (WorkerState(c, c, 1) for c in ("small", "big"))
    assert [d.worker for d in Policy(fleet).decide(one_gb, [small, big], now=0.0)] == ["small"]

    bus = await Bus.connect(nats_url, "test-live-sizes")
    sched = Scheduler(bus, fleet=fleet, tick_s=0.01)
    await sched.start()
    got: list[str] = []

    async def on_assign(msg: Any) -> None:
        got.append(subjects.worker_of_assign_subject(msg.subject))

    sub = await bus.nc.subscribe(subjects.ASSIGN_ALL, cb=on_assign)
    try:
        kv = await bus.kv(streams.KV_WORKERS)
        for cls in ("small", "big"):
            info = WorkerInfo(
                worker=cls,
                device_class=cls,
                pools=["gpu"],
                executors={"generate": "1"},
                max_batch={"generate": 32},
                models={"m": digest},
                resident=[],
                price_per_hour=0.2 if cls == "small" else 2.0,
                watts=300.0,
                memory_gb=24.0 if cls == "small" else 80.0,
                slots=1,
                batches_done=0,
                started_at=time.time(),
                sent_at=time.time(),
                model_gb={digest: 40.0},
            )
            await kv.put(cls, codec.encode(info))
        spec = OpSpec("generate", "generate", "1", "record", {}, digest, ["b" * 64])
        op = ReadyOp(key="k" * 64, spec=spec, batch_key="bk", workflow_id="wf", tenant="t")
        await bus.publish(subjects.ready("gpu"), chunks_of([op], 1)[0], msg_id=op.key)
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == ["big"]
    finally:
        await sub.unsubscribe()
        await sched.stop()
        await bus.close()


def replace_gb(it: ReadyItem, gb: float) -> ReadyItem:
    from dataclasses import replace

    return replace(it, model_gb=gb)


def test_latency_estimator_stays_on_its_data_when_batch_sizes_barely_vary() -> None:
    """Batches nearly all full (as on a busy pool): one smaller batch must not tip the
    fit into a line that misses every observation (a negative intercept clipped to 0
    left the slope of a steep line: 64 items predicted at twice their observed time,
    and the utility then preferred slower classes)."""
    fleet = fleet_of(gpu={"price_per_hour": 2.0})
    est = LatencyEstimator(fleet)
    full = 0.4 + 0.05 * 32  # what a full batch of 32 really takes
    noise = [1.0, 0.9, 1.1, 0.95, 1.05, 1.12, 0.88]
    for i in range(300):
        est.observe("gpu", "generate", 32, full * noise[i % len(noise)])
    est.observe("gpu", "generate", 28, 0.6 * full)  # one short, fast batch
    for i in range(5):
        est.observe("gpu", "generate", 32, full * noise[i])
    learned = est.model("gpu", "generate")
    assert learned is not None
    assert learned.seconds(32) == pytest.approx(full, rel=0.15)
    assert learned.fixed_s >= 0 and learned.per_item_s > 0


SNAPSHOTS = Path(__file__).resolve().parent / "data" / "policy_snapshots.json.gz"


def test_same_decisions_as_recorded_rounds() -> None:
    """Rounds recorded from the policy before its rewrite for speed (simulator runs of
    smoke, rlhf-mix with hold_s and agentic, plus bench-scheduler inputs; made by
    scripts/record_policy_snapshots.py, fairness weight 0): the same batches go to the
    same workers with the same model loads and evictions, whether the round is handed a
    flat list or ready groups. The fleet is the profile they were recorded with
    (tests/data/fleet_recorded.yaml, the default one before its per-kind speeds)."""
    import dataclasses
    import gzip
    import json

    from flowmesh.engine.scheduler.fleet import LatencyModel
    from flowmesh.engine.scheduler.groups import group_ready

    fleet = load_fleet(SNAPSHOTS.parent / "fleet_recorded.yaml")
    fields = [f.name for f in dataclasses.fields(ReadyItem)]
    snaps = json.loads(gzip.decompress(SNAPSHOTS.read_bytes()))
    assert len(snaps) > 100
    for grouped in (False, True):
        for snap in snaps:
            c = snap["config"]
            cfg = PolicyConfig(
                weights=Weights(**c["weights"]),
                linger_s=c["linger_s"],
                aging_scale_s=c["aging_scale_s"],
                spread_efficiency=c["spread_efficiency"],
                hold_s=c["hold_s"],
            )
            est = LatencyEstimator(fleet)
            for ck, (fixed, per, maxb) in snap["estimator"].items():
                cls, kind = ck.split("|")
                est._cache[(cls, kind)] = LatencyModel(fixed, per, maxb)
            # recorded before deadline_at existed: the fields it has, in order
            items = [ReadyItem(**dict(zip(fields, row, strict=False))) for row in snap["items"]]
            workers = [
                WorkerState(
                    id=w["id"],
                    device_class=w["device_class"],
                    free_slots=w["free_slots"],
                    resident=dict(w["resident"]),
                    executors=None if w["executors"] is None else frozenset(w["executors"]),
                    models=None if w["models"] is None else frozenset(w["models"]),
                    batch_caps=w["batch_caps"],
                    startup_s=w["startup_s"],
                    busy_until=w["busy_until"],
                )
                for w in snap["workers"]
            ]
            fair = FairShare(cfg.tenants)
            if snap["fair"]:
                fair.usage.update(snap["fair"]["usage"])
                fair.spent_usd.update(snap["fair"]["spent"])
                fair._at = snap["fair"]["at"]
            policy = Policy(fleet, cfg, est)
            if grouped:
                out = policy.decide_groups(group_ready(items), workers, snap["now"], fair)
            else:
                out = policy.decide(items, workers, snap["now"], fair)
            got = [
                {
                    "worker": d.worker,
                    "items": [i.key for i in d.items],
                    "load_model": d.load_model,
                    "evict": list(d.evict),
                }
                for d in out
            ]
            keys = ("worker", "items", "load_model", "evict")
            want = [{k: d[k] for k in keys} for d in snap["decisions"]]
            assert got == want
            for d, w in zip(out, snap["decisions"], strict=True):
                assert d.seconds == pytest.approx(w["seconds"], rel=1e-12)


def test_a_latency_budget_moves_throughput_work_to_the_cheap_class() -> None:
    """With hours of slack before its workflow's deadline a batch weighs cost over
    speed and goes to the slow cheap class; near the deadline (or without one) it goes
    to the fast one."""
    from dataclasses import replace

    # the fast class: 3x the speed at 4x the price (and 3x the power: same J/op)
    fleet = fleet_of(
        fast={"price_per_hour": 1.2, "speed": 3.0, "watts_busy": 900},
        slow={"price_per_hour": 0.3, "speed": 1.0, "watts_busy": 300},
    )

    def pick(deadline_at: float) -> str:
        items = [replace(item(i), deadline_at=deadline_at) for i in range(32)]
        warm = {"m": 10.0}
        workers = [WorkerState("f", "fast", 1, dict(warm)), WorkerState("s", "slow", 1, dict(warm))]
        [d] = Policy(fleet, PolicyConfig(spread_efficiency=0.99)).decide(items, workers, 0.0)
        return d.device_class

    assert pick(float("inf")) == "fast"
    assert pick(60.0) == "fast"
    assert pick(6 * 3600.0) == "slow"


def test_small_tenant_sharing_a_backlogs_batch_key_gets_a_batch_of_its_own() -> None:
    """The large-workflow scenario: another tenant's operators have the batch key of a
    backlog that has had the worker. Left in the shared group they sit behind thousands of
    older operators (oldest first), and once reached they ride in a 256-operator batch
    whose one done message comes at its end. Split out, they are the next batch, alone."""
    fleet = load_fleet(REPO / "configs/fleet/default.yaml")
    cfg = PolicyConfig()
    policy = Policy(fleet, cfg)
    fair = FairShare(cfg.tenants)
    big = [replace_kind(item(i, tenant="big", bkey="map", model=None), "map") for i in range(4096)]
    worker = WorkerState("w", "cpu-amx", 1)
    now = 0.0
    for _ in range(3):
        worker.free_slots = 1
        [d] = policy.decide(big, worker_list(worker), now, fair)
        big = big[len(d.items) :]
        now += d.seconds
    small = [
        replace_kind(item(10_000 + i, tenant="small", bkey="map", model=None, ready_at=now), "map")
        for i in range(5)
    ]
    worker.free_slots = 1
    [d] = policy.decide([*big, *small], worker_list(worker), now + 0.5, fair)
    assert [it.tenant for it in d.items] == ["small"] * 5
    # the backlog keeps batching: the next round takes a full batch of its own
    worker.free_slots = 1
    [d2] = policy.decide(big, worker_list(worker), now + 1.0, fair)
    assert {it.tenant for it in d2.items} == {"big"} and len(d2.items) == 256
    # without the split the small tenant's operators wait at the shared group's tail
    worker.free_slots = 1
    whole = Policy(fleet, PolicyConfig(split_deficit=math.inf))
    [d_whole] = whole.decide([*big, *small], worker_list(worker), now + 0.5, fair)
    assert "small" not in {it.tenant for it in d_whole.items}


def test_tenants_at_their_share_keep_batching_together() -> None:
    """Splitting is for a tenant far below its share: two tenants that both had the
    worker share one batch key's batch as before."""
    fleet = load_fleet(REPO / "configs/fleet/default.yaml")
    cfg = PolicyConfig()
    fair = FairShare(cfg.tenants)
    fair.charge("a", 10.0, 0.01, now=0.0)
    fair.charge("b", 8.0, 0.01, now=0.0)
    items = [
        replace_kind(item(i, tenant="ab"[i % 2], bkey="map", model=None), "map") for i in range(40)
    ]
    [d] = Policy(fleet, cfg).decide(items, [WorkerState("w", "cpu-amx", 1)], 1.0, fair)
    assert {it.tenant for it in d.items} == {"a", "b"}


async def test_a_backlog_that_fills_the_pool_does_not_hide_another_tenants_chunk(
    nats_url: str,
) -> None:
    """One tenant's ready chunks fill the live scheduler's pool and more wait behind in
    the stream; another tenant's chunk published after them still reaches the pool at
    once (read past the limit into per-tenant overflow, admitted because its tenant
    holds little), and the backlog's overflow moves into the pool as room frees."""
    import asyncio

    from flowmesh.engine.scheduler.live import Scheduler
    from flowmesh.topics import Bus, subjects
    from flowmesh.topics.messages import OpSpec, ReadyOp, chunks_of

    bus = await Bus.connect(nats_url, "test-live-overflow")
    # no worker: nothing is assigned, so only intake moves operators
    sched = Scheduler(bus, fleet=fleet_of(gpu={"price_per_hour": 1.0}), pool_limit=64)
    await sched.start()
    try:
        spec = OpSpec("map", "map", "1", "record", {}, None, [])

        def ops(tenant: str, n: int) -> list[ReadyOp]:
            return [
                ReadyOp(
                    key=f"{tenant}-{i:06d}".ljust(64, "0"),
                    spec=spec,
                    batch_key="bk",
                    workflow_id=f"wf-{tenant}",
                    tenant=tenant,
                )
                for i in range(n)
            ]

        for j, chunk in enumerate(chunks_of(ops("bulk", 320), 16)):
            await bus.publish(subjects.ready("cpu"), chunk, msg_id=f"bulk-{j}")
        [small] = chunks_of(ops("small", 3), 16)
        await bus.publish(subjects.ready("cpu"), small, msg_id="small")
        for _ in range(300):
            if sched.held_by.get("small") == 3:
                break
            await asyncio.sleep(0.02)
        assert sched.held_by.get("small") == 3, dict(sched.held_by)
        # the backlog filled the pool to its limit and no further; the rest waits
        assert sched.held_by["bulk"] == 64
        assert sched.overflow_ops == 320 - 64
        # room frees (as assignments would take operators): the backlog moves up
        for key in [k for k in list(sched.pool) if k.startswith("bulk")][:32]:
            sched._take(key)
        await sched._promote()
        assert sched.held_by["bulk"] == 64 and sched.overflow_ops == 320 - 96
    finally:
        await sched.stop()
        await bus.close()


def test_a_tenant_far_below_its_share_is_served_first_even_with_one_operator() -> None:
    """A lone operator of a tenant that got nothing loses on throughput and cost to any
    full batch by more than the fairness term is worth; below `split_deficit` it is
    served first anyway (the live run's 2-operator workflow waited 6 s without this)."""
    fleet = load_fleet(REPO / "configs/fleet/default.yaml")
    cfg = PolicyConfig()
    fair = FairShare(cfg.tenants)
    fair.charge("bulk", 100.0, 0.1, now=0.0)
    big = [
        replace_kind(item(i, tenant="bulk", bkey="map", model=None, ready_at=-5.0), "map")
        for i in range(4096)
    ]
    lone = [replace_kind(item(9999, tenant="lone", bkey="map", model=None, ready_at=0.5), "map")]
    worker = WorkerState("w", "cpu-amx", 1)
    [d] = Policy(fleet, cfg).decide([*big, *lone], [worker], 1.0, fair)
    assert [it.tenant for it in d.items] == ["lone"]
    # the premise: without the boost the full batch wins
    worker.free_slots = 1
    plain = Policy(fleet, PolicyConfig(split_boost=0.0))
    [d_plain] = plain.decide([*big, *lone], [worker], 1.0, fair)
    assert {it.tenant for it in d_plain.items} == {"bulk"}


def test_a_group_rescored_in_floats_scores_as_numpy_does() -> None:
    """After a pick the round rescores the picked group in plain floats (rescore.py);
    those scores are exactly the numpy scores of every worker variant, whatever the
    group's size, age and idle workers (cold, capped and restricted workers, fair
    share with history, deadlines), so the round's decisions do not change."""
    import dataclasses
    import random

    import numpy as np

    from flowmesh.configs import path as config_path
    from flowmesh.engine.scheduler.groups import group_ready
    from flowmesh.engine.scheduler.rescore import score_column
    from flowmesh.loadgen.sim.bench import bench_inputs

    fleet = load_fleet(config_path("fleet/default.yaml"))
    rng = random.Random(7)
    items, layout = bench_inputs(fleet, n_items=600, n_workers=40, n_groups=30, seed=3)
    items = [
        dataclasses.replace(i, deadline_at=rng.uniform(100, 900)) if rng.random() < 0.3 else i
        for i in items
    ]
    workers = []
    for wid, cls, res in layout:
        w = WorkerState(wid, cls, rng.choice([1, 2]), dict(res))
        w.startup_s = rng.choice([0.0, 0.0, 45.0])
        if rng.random() < 0.2:
            w.batch_caps = {"generate@1": 8, "map@1": 16}
        workers.append(w)
    config = PolicyConfig(linger_s=0.25)
    fair = FairShare()
    for t in range(32):
        fair.charge(f"t{t}", rng.uniform(0, 50), 0.0, 100.0)
    policy = Policy(fleet, config)
    free, soon = policy._available(workers, 120.0)
    groups = policy._eligible(group_ready(items), fair)
    tenants = set().union(*(g.tenants for g in groups))
    rnd = policy._round_tables(
        groups, free, soon, 120.0, fair, tenants, fair.deficits(tenants, 120.0)
    )
    policy._score_all(rnd)
    assert rnd.best is not None  # finite inputs: the float path is the one taken
    w = config.weights
    for gi in range(len(groups)):
        types = rnd.compat[:, gi].nonzero()[0].tolist()
        for n_col, oldest, idle in ((1.0, 0.1, 0), (7.0, 3.0, 2), (40.0, 90.0, 11)):
            vs, got = score_column(
                policy._floats(rnd),
                gi,
                types,
                rnd.live,
                n_col,
                oldest,
                idle,
                w.cost,
                w.energy,
                w.locality,
                w.aging,
                config.aging_scale_s,
                config.linger_s,
            )
            g = slice(gi, gi + 1)
            want, _, _ = policy._score(
                rnd, slice(None), g, np.array([n_col]), np.array([oldest]), np.array([idle])
            )
            assert vs  # every group here has a worker type that runs it
            assert got == [float(want[v, 0]) for v in vs]


def test_the_best_pair_kept_per_group_is_the_argmax_over_all_pairs() -> None:
    """The round's pick read from the best worker kept per group is the pair np.argmax
    over the whole (worker, group) matrix gives, ties included (first worker, then
    first group), as groups are rescored and workers lose or change their scores
    (stale groups among them: a worker that was best drops or scores less)."""
    import random

    import numpy as np

    from flowmesh.engine.scheduler.rescore import NEG, BestPerGroup

    rng = random.Random(3)
    for _ in range(300):
        G, W = rng.randint(1, 12), rng.randint(1, 12)
        # few distinct values: many ties
        scores = np.array(
            [[float(rng.randint(0, 4)) if rng.random() < 0.9 else NEG for _ in range(W)]
             for _ in range(G)]
        )  # fmt: skip
        best = BestPerGroup(scores)
        for _ in range(40):
            want_flat = int(np.argmax(scores.T))
            pick = best.pick()
            if scores.max() == NEG:
                assert pick is None
                break
            wi, gi = divmod(want_flat, G)
            assert pick == (wi, gi, float(scores[gi, wi]))
            op = rng.random()
            if op < 0.4:
                scores[:, wi] = NEG
                best.worker_dropped(wi)
            elif op < 0.7:  # the picked worker or another one
                w = wi if rng.random() < 0.5 else rng.randrange(W)
                scores[:, w] = [float(rng.randint(0, 4)) for _ in range(G)]
                best.worker_changed(w)
            if rng.random() < 0.8:
                scores[gi] = [
                    float(rng.randint(0, 4)) if rng.random() < 0.7 else NEG for _ in range(W)
                ]
                best.group_changed(gi)


def test_tenants_are_charged_per_operator_in_the_order_they_first_appear() -> None:
    """A round charges each tenant, per decision in order, the decision's device-seconds
    and $ per operator times its operators there (the same float sums), tenants in the
    order they first appear in the decisions: with groups that keep their tenants and
    with groups built without them (the names are then read from the operators)."""
    import collections

    from flowmesh.configs import path as config_path
    from flowmesh.engine.scheduler.groups import ReadyGroup, group_ready
    from flowmesh.loadgen.sim.bench import bench_inputs

    fleet = load_fleet(config_path("fleet/default.yaml"))
    items, layout = bench_inputs(fleet, n_items=800, n_workers=30, n_groups=12, seed=5)
    kept = group_ready(items)
    bare = [ReadyGroup(g.batch_key, g.items) for g in kept]  # no tenants, no names kept
    for groups in (kept, bare):
        workers = [WorkerState(wid, cls, 2, dict(res)) for wid, cls, res in layout]
        fair = FairShare()
        out = Policy(fleet, PolicyConfig()).decide_groups(groups, workers, 120.0, fair)
        assert out
        device: dict[str, float] = {}
        cost: dict[str, float] = {}
        for d in out:
            n = len(d.items)
            for tenant, k in collections.Counter(i.tenant for i in d.items).items():
                device[tenant] = device.get(tenant, 0.0) + d.seconds / n * k
                cost[tenant] = cost.get(tenant, 0.0) + d.cost_usd / n * k
        assert list(fair.usage.items()) == list(device.items())
        assert list(fair.spent_usd.items()) == list(cost.items())
