"""Benchmarks (not timed tests): one Policy.decide round at scale, and the simulator's wall
time for a large fleet and operator count."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowmesh.engine.scheduler.fairness import FairShare
from flowmesh.engine.scheduler.fleet import Fleet
from flowmesh.engine.scheduler.groups import group_ready
from flowmesh.engine.scheduler.policy import Policy, PolicyConfig, ReadyItem, WorkerState
from flowmesh.loadgen.sim.metrics import PolicyResult, simulate
from flowmesh.loadgen.sim.workload import Workload, parse_workload

GPU_KINDS = ("generate", "score", "embed", "train")
CPU_KINDS = ("map", "filter", "group")


@dataclass
class SchedulerBench:
    """Per run: wall and process CPU milliseconds of one round over ready groups kept by
    batch key (what a scheduler that groups operators as they arrive hands the policy),
    and of one round over the flat list (grouped inside the round)."""

    items: int
    workers: int
    groups: int
    runs_ms: list[float]
    cpu_ms: list[float]
    flat_ms: list[float]
    decisions: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)


def bench_inputs(
    fleet: Fleet,
    n_items: int = 10_000,
    n_workers: int = 200,
    n_groups: int = 200,
    seed: int = 0,
) -> tuple[list[ReadyItem], list[tuple[str, str, dict[str, float]]]]:
    """`n_items` ready operators in `n_groups` batch keys (a mix of GPU and CPU kinds, 24
    models, 32 tenants) and the layout of `n_workers` workers (id, class, resident
    models) spread over the fleet's classes."""
    rng = random.Random(seed)
    kinds = [k for k in (*GPU_KINDS, *CPU_KINDS) if k in fleet.kinds]
    models = [f"model-{i}" for i in range(24)]
    groups = []
    for g in range(n_groups):
        kind = kinds[g % len(kinds)]
        model = rng.choice(models) if kind in GPU_KINDS else None
        gb = (0.5 if kind == "embed" else 16.0) if model else 0.0
        groups.append((f"bk{g}", kind, model, gb))
    items = []
    for i in range(n_items):
        bk, kind, model, gb = groups[rng.randrange(n_groups)]
        items.append(
            ReadyItem(
                key=f"op{i}",
                batch_key=bk,
                kind=kind,
                executor=f"{kind}@1",
                model=model,
                model_gb=gb,
                input_bytes=2048,
                tenant=f"t{rng.randrange(32)}",
                workflow_id=f"wf{rng.randrange(500)}",
                ready_at=rng.uniform(0.0, 120.0),
            )
        )
    classes = list(fleet.classes)
    layout = []
    for w in range(n_workers):
        cls = classes[w % len(classes)]
        resident = {m: 16.0 for m in rng.sample(models, rng.randrange(3))}
        layout.append((f"w{w}", cls, resident))
    return items, layout


def bench_scheduler(
    fleet: Fleet,
    config: PolicyConfig,
    n_items: int = 10_000,
    n_workers: int = 200,
    n_groups: int = 200,
    runs: int = 5,
    seed: int = 0,
) -> SchedulerBench:
    """Median wall time of one Policy.decide round over `n_items` ready operators in
    `n_groups` batch keys and `n_workers` free workers (`bench_inputs`)."""
    items, layout = bench_inputs(fleet, n_items, n_workers, n_groups, seed)
    groups = group_ready(items)
    policy = Policy(fleet, config)
    times, cpu, flat, decisions = [], [], [], 0
    for _ in range(runs):
        workers = [WorkerState(wid, cls, 1, dict(res)) for wid, cls, res in layout]
        t0, c0 = time.perf_counter(), time.process_time()
        out = policy.decide_groups(groups, workers, 120.0, FairShare(config.tenants))
        times.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
        decisions = len(out)
        workers = [WorkerState(wid, cls, 1, dict(res)) for wid, cls, res in layout]
        t0 = time.perf_counter()
        policy.decide(items, workers, 120.0, FairShare(config.tenants))
        flat.append(1000 * (time.perf_counter() - t0))
    return SchedulerBench(n_items, n_workers, n_groups, times, cpu, flat, decisions)


def scale_workload(gpus: int, operators: int, seed: int = 0, window_s: float = 60.0) -> Workload:
    """An rlhf-mix-shaped workload with about `operators` operators on a pool of `gpus`
    GPUs (40% h100, 20% each a100, l40s, rtx4090) plus gpus/10 CPUs, arriving uniformly
    over `window_s` from 32 tenants: with the default minute the backlog is far larger
    than the pool, so the whole pool is allocated and every round sees many workers."""
    records, n, heldout = 512, 4, 256
    per_wf = records * n * 2 + records * 2 + heldout
    workflows = max(1, math.ceil(operators / per_wf))
    tenants = min(32, workflows)
    per_tenant = math.ceil(workflows / tenants)
    fleet = {
        "h100": gpus - 3 * (gpus // 5),
        "a100": gpus // 5,
        "l40s": gpus // 5,
        "rtx4090": gpus // 5,
        "cpu-amx": max(1, gpus // 10),
    }
    doc: dict[str, Any] = {
        "name": f"scale-{gpus}gpu-{operators}ops",
        "seed": seed,
        "fleet": {k: v for k, v in fleet.items() if v > 0},
        "billing": {"cold_start_s": 60, "idle_release_s": 60},
        # a low target: the backlog is spread over the whole pool
        "autoscale": {"target_backlog_s": 20, "min_workers": {"cpu-amx": 1}},
        "preemption": {"rate_per_hour": 0.02, "restart_s": 120},
        "max_groups": 64,
        "datasets": {
            "prompts": {"records": records, "overlap": 0.5, "shared_pool": 16384},
            "heldout": {"records": heldout, "overlap": 1.0, "shared_pool": heldout},
        },
        "templates": {
            "round": [
                {
                    "name": "samples",
                    "kind": "generate",
                    "model": "base-8b",
                    "model_gb": 16,
                    "input": "prompts",
                    "n": n,
                    "params": {"temperature": 0.9, "seed": 0},
                },
                {
                    "name": "rewards",
                    "kind": "score",
                    "model": "{rm}",
                    "model_gb": 16,
                    "input": "samples",
                },
                {"name": "best", "kind": "group", "input": "rewards", "reduce": "record"},
                {
                    "name": "sft",
                    "kind": "train",
                    "model": "adapter-{workflow}",
                    "model_gb": 16,
                    "input": "best",
                    "after": ["best"],
                    "private": True,
                },
                {
                    "name": "eval",
                    "kind": "generate",
                    "model": "adapter-{workflow}",
                    "model_gb": 16,
                    "input": "heldout",
                    "after": ["sft"],
                },
            ]
        },
        "defaults": {
            "arrivals": {
                "process": "uniform",
                "rate_per_h": per_tenant * 3600.0 / window_s,
                "count": per_tenant,
            }
        },
        "tenants": [
            {
                "name": f"t{i}",
                "vars": {"rm": f"rm-{i % 4}"},
                "arrivals": {"start_s": i * window_s / tenants / per_tenant},
            }
            for i in range(tenants)
        ],
    }
    return parse_workload(doc)


def bench_sim(
    fleet: Fleet,
    config: PolicyConfig,
    gpus: int,
    operators: int,
    policy: str = "flowmesh",
    progress: Callable[[int, int], None] | None = None,
    window_s: float = 60.0,
) -> tuple[Workload, PolicyResult]:
    wl = scale_workload(gpus, operators, window_s=window_s)
    return wl, simulate(wl, fleet, config, policy, progress)
