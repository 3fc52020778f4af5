"""Workload files (configs/workloads/*.yaml) -> concrete workflows with operator DAGs.

A workload names tenants, workflow templates (DAGs of stages), datasets and arrivals::

    name: rlhf-mix
    seed: 7
    fleet: {h100: 16, l40s: 16, cpu-amx: 8}   # shared policies: the elastic pool's cap
    isolated: {gpu: h100, cpu: cpu-amx, per: model}   # dedicated workers per workflow
    billing: {cold_start_s: 60, idle_release_s: 60}
    autoscale: {target_backlog_s: 120, min_workers: {cpu-amx: 1}}
    noise_sigma: 0.15                # lognormal noise on every batch's run time
    preemption: {rate_per_hour: 0.02, restart_s: 120}   # kills per allocated worker-hour
    levers: {dedup: true, batching: true, packing: true, heterogeneity: true, release: true}
                                     # flowmesh's levers (Levers), an ablation turns one off
    datasets:
      prompts: {records: 512, overlap: 0.5, shared_pool: 4096, draw: random}
    templates:
      round:
        - {name: gen, kind: generate, model: base-8b, model_gb: 16, input: prompts, n: 4,
           params: {temperature: 0.9, max_new_tokens: 256, seed: 0}}
        - {name: rm, kind: score, model: "{reward_model}", model_gb: 16, input: gen}
        - {name: best, kind: group, input: rm, reduce: record}
        - {name: sft, kind: train, model: "adapter-{workflow}", model_gb: 16, input: best,
           after: [best], private: true}
    defaults: {arrivals: {process: poisson, rate_per_h: 2, duration_s: 10800}}
    tenants:
      - {name: a, templates: [round], vars: {reward_model: rm-a}}
      - {name: b, templates: [round], vars: {reward_model: rm-b}, dedup_scope: tenant}

Datasets. Each workflow draws `records` records from a dataset: a fraction `overlap` from
a pool of `shared_pool` records that every tenant draws from (`draw: random`: a uniform
sample without replacement per workflow; `sequential`: every tenant walks the pool in the
same order, as when all iterate one public dataset in its canonical order; `zipf`: a
sample without replacement where the i-th record has weight 1 / i^zipf_s, popular
records first), the rest private to the tenant (fresh records, or draws from a
`private_pool` of that size).

Arrivals per tenant: `poisson`, `uniform`, `bursty` (Poisson bursts of `burst_size`),
`onoff` (Poisson at `peak` x the mean rate during `on_s` windows, the rest of the mean
rate in the `off_s` windows between). `deadline_s` on a tenant (or in defaults): each of
its workflows' latency budget, which `isolated-lean` sizes its class choice by.

Stages. `input` is a dataset or an earlier stage. A stage runs one operator per input
item times `n` (samples per item: sample i is part of the key, not of the batch key, so
the n samples of a prompt batch together), or with `reduce: record` one operator per
source record over all of that record's items, or with `reduce: all` one operator over
everything. `after: [stages]` holds the whole stage until those stages are complete (a
trainer that waits for its data set; an eval that waits for the trained weights).
`private: true` salts the stage's keys with the workflow: work that depends on state the
workflow owns (optimizer state, its own weights) is never the same as anyone else's.
Model names are templates over `{tenant}`, `{workflow}`, `{round}` and the tenant's vars.

Keys. An operator's identity is hash(kind, model, canonical params incl. seed, sample,
content identity of its inputs): two tenants that run the same model with the same params
over the same record produce the same key, exactly as FlowMesh keys by content (inputs
by content, not by which upstream operator made them). A tenant with `dedup_scope:
tenant` (or `workflow`) salts its keys, so they never match another tenant's.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

Reduce = Literal["none", "record", "all"]
Scope = Literal["global", "tenant", "workflow"]
Draw = Literal["random", "sequential", "zipf"]


def digest(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=10).hexdigest()


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    input: str
    model: str | None = None  # a template: "{tenant}", "{workflow}", "{round}", vars
    model_gb: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)
    n: int = 1
    reduce: Reduce = "none"
    after: tuple[str, ...] = ()
    private: bool = False
    input_bytes: int = 2048


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    records: int
    overlap: float = 0.0
    shared_pool: int = 0
    draw: Draw = "random"
    private_pool: int | None = None  # None: every private record is fresh
    zipf_s: float = 1.1  # draw: zipf: popularity of the i-th shared record ~ 1 / i^s


@dataclass(frozen=True)
class ArrivalSpec:
    process: Literal["poisson", "bursty", "uniform", "onoff"] = "poisson"
    rate_per_h: float = 1.0
    duration_s: float | None = 3600.0
    count: int | None = None  # exactly this many (overrides duration_s)
    start_s: float = 0.0
    burst_size: int = 4  # bursty: workflows per burst (bursts arrive at rate/burst_size)
    burst_spread_s: float = 5.0
    # onoff: Poisson arrivals at rate x peak during `on_s` windows, the rest of the mean
    # rate spread over the `off_s` windows between them (none when peak x on covers it)
    on_s: float = 600.0
    off_s: float = 1800.0
    peak: float = 4.0


@dataclass(frozen=True)
class TenantSpec:
    name: str
    templates: tuple[tuple[str, float], ...]  # (template, weight)
    arrivals: ArrivalSpec
    vars: Mapping[str, str] = field(default_factory=dict)
    dedup_scope: Scope = "global"
    overlap: float | None = None  # overrides every dataset's overlap for this tenant
    deadline_s: float | None = None  # each workflow's latency budget from its arrival


@dataclass(frozen=True)
class IsolatedSpec:
    gpu: str = "h100"
    cpu: str = "cpu-amx"
    per: Literal["model", "model-kind"] = "model"


LEVERS = ("dedup", "batching", "packing", "heterogeneity", "release", "prewarm")


@dataclass(frozen=True)
class Levers:
    """What `flowmesh` does beyond a shared pool, each on by default; an ablation turns
    one off to measure what it gives (`loadgen sweep --ablate`, `--levers-off`):

    - dedup: content-keyed dedup of completed and in-flight operators (off: every
      operator runs, as the baselines do);
    - batching: one batch across workflows (off: a batch holds one workflow's operators);
    - packing: several models resident per GPU, by memory (off: a GPU holds one model;
      switching models is a load);
    - heterogeneity: the pool's GPU classes to choose from (off: the shared pool's GPUs
      are all the one class a user would rent, `isolated.gpu`, as many as the pool's GPUs);
    - release: the forecast release of idle workers (off: `release: fixed`, every idle
      worker waits idle_release_s);
    - prewarm: with the forecast release, CPU workers started ahead of the work the
      running workflows' next stages will make ready (engine.scheduler.elastic.prewarm;
      off: a CPU worker starts only once its work is ready).
    """

    dedup: bool = True
    batching: bool = True
    packing: bool = True
    heterogeneity: bool = True
    release: bool = True
    prewarm: bool = True

    def without(self, names: Sequence[str]) -> Levers:
        unknown = set(names) - set(LEVERS)
        if unknown:
            raise ValueError(f"unknown levers {sorted(unknown)}; known: {', '.join(LEVERS)}")
        return replace(self, **dict.fromkeys(names, False))

    def off(self) -> tuple[str, ...]:
        return tuple(n for n in LEVERS if not getattr(self, n))


@dataclass(frozen=True)
class SimSettings:
    fleet: Mapping[str, int]  # class -> workers in the shared pool (cap)
    isolated: IsolatedSpec = field(default_factory=IsolatedSpec)
    cold_start_s: float = 60.0
    idle_release_s: float = 60.0
    target_backlog_s: float = 120.0
    min_workers: Mapping[str, int] = field(default_factory=dict)  # kept warm while running
    max_wait_s: float | None = None  # work waiting longer than this may add a worker
    noise_sigma: float = 0.15
    preempt_rate_per_h: float = 0.0  # kills per allocated worker-hour
    restart_s: float = 120.0
    profile_error: Mapping[str, float] = field(default_factory=dict)  # class -> true/profile
    max_groups: int | None = None  # flowmesh: hand the policy only the oldest K groups
    # may CPU classes take GPU-pool kinds (generate/score/...) their profile lists? The
    # baselines never do; false holds flowmesh to the same deployment
    cpu_runs_gpu_kinds: bool = False
    levers: Levers = field(default_factory=Levers)  # flowmesh's, for ablations


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    settings: SimSettings
    datasets: Mapping[str, DatasetSpec]
    templates: Mapping[str, tuple[StageSpec, ...]]
    tenants: tuple[TenantSpec, ...]
    description: str = ""

    def with_overrides(
        self,
        *,
        seed: int | None = None,
        overlap: float | None = None,
        idle_release_s: float | None = None,
        preempt_rate_per_h: float | None = None,
        max_groups: int | None = None,
        cpu_runs_gpu_kinds: bool | None = None,
        target_backlog_s: float | None = None,
        max_wait_s: float | None = None,
        isolated_per: str | None = None,
        levers_off: Sequence[str] | None = None,
    ) -> Workload:
        out = self
        if seed is not None:
            out = replace(out, seed=seed)
        if overlap is not None:
            out = replace(
                out,
                datasets={k: replace(d, overlap=overlap) for k, d in out.datasets.items()},
                tenants=tuple(replace(t, overlap=None) for t in out.tenants),
            )
        s = out.settings
        if idle_release_s is not None:
            s = replace(s, idle_release_s=idle_release_s)
        if preempt_rate_per_h is not None:
            s = replace(s, preempt_rate_per_h=preempt_rate_per_h)
        if max_groups is not None:
            s = replace(s, max_groups=max_groups)
        if cpu_runs_gpu_kinds is not None:
            s = replace(s, cpu_runs_gpu_kinds=cpu_runs_gpu_kinds)
        if target_backlog_s is not None:
            s = replace(s, target_backlog_s=target_backlog_s)
        if isolated_per is not None:
            if isolated_per not in ("model", "model-kind"):
                raise ValueError("isolated per must be model or model-kind")
            per: Literal["model", "model-kind"] = (
                "model" if isolated_per == "model" else "model-kind"
            )
            s = replace(s, isolated=replace(s.isolated, per=per))
        if max_wait_s is not None:
            s = replace(s, max_wait_s=max_wait_s if max_wait_s >= 0 else None)
        if levers_off:
            s = replace(s, levers=s.levers.without(levers_off))
        return replace(out, settings=s)


@dataclass(frozen=True)
class WorkflowInstance:
    id: str
    tenant: str
    template: str
    round: int  # the tenant's n-th workflow
    arrival: float
    records: Mapping[str, tuple[str, ...]]  # dataset -> record identities
    deadline_s: float | None = None


# --- parsing ------------------------------------------------------------------------


def _stage(raw: Mapping[str, Any]) -> StageSpec:
    known = {f for f in StageSpec.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"stage {raw.get('name')!r}: unknown fields {sorted(unknown)}")
    after = raw.get("after") or ()
    return StageSpec(
        name=str(raw["name"]),
        kind=str(raw["kind"]),
        input=str(raw["input"]),
        model=None if raw.get("model") is None else str(raw["model"]),
        model_gb=float(raw.get("model_gb", 0.0)),
        params=dict(raw.get("params") or {}),
        n=int(raw.get("n", 1)),
        reduce=raw.get("reduce", "none"),
        after=tuple(str(a) for a in ([after] if isinstance(after, str) else after)),
        private=bool(raw.get("private", False)),
        input_bytes=int(raw.get("input_bytes", 2048)),
    )


def _arrivals(raw: Mapping[str, Any]) -> ArrivalSpec:
    known = {f for f in ArrivalSpec.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"arrivals: unknown fields {sorted(unknown)}")
    return ArrivalSpec(**raw)


def _levers(raw: Mapping[str, Any]) -> Levers:
    unknown = set(raw) - set(LEVERS)
    if unknown:
        raise ValueError(f"levers: unknown {sorted(unknown)}; known: {', '.join(LEVERS)}")
    return Levers().without([str(k) for k, on in raw.items() if not on])


def parse_workload(data: Mapping[str, Any]) -> Workload:
    raw_ds = data.get("datasets") or {}
    datasets = {name: DatasetSpec(name=name, **(d or {})) for name, d in raw_ds.items()}
    templates: dict[str, tuple[StageSpec, ...]] = {}
    for tname, raw in (data.get("templates") or {}).items():
        stages = raw["stages"] if isinstance(raw, Mapping) else raw
        templates[tname] = tuple(_stage(s) for s in stages)
    defaults = dict(data.get("defaults") or {})
    tenants = []
    for raw_t in data.get("tenants") or []:
        t = {**defaults, **raw_t}
        tmpl = t.get("templates") or list(templates)
        pairs = (
            tuple((str(k), float(v)) for k, v in tmpl.items())
            if isinstance(tmpl, Mapping)
            else tuple((str(k), 1.0) for k in tmpl)
        )
        arr = {**(defaults.get("arrivals") or {}), **(raw_t.get("arrivals") or {})}
        tenants.append(
            TenantSpec(
                name=str(t["name"]),
                templates=pairs,
                arrivals=_arrivals(arr),
                vars={str(k): str(v) for k, v in (t.get("vars") or {}).items()},
                dedup_scope=t.get("dedup_scope", "global"),
                overlap=None if t.get("overlap") is None else float(t["overlap"]),
                deadline_s=None if t.get("deadline_s") is None else float(t["deadline_s"]),
            )
        )
    billing = data.get("billing") or {}
    preempt = data.get("preemption") or {}
    iso = data.get("isolated") or {}
    autoscale = data.get("autoscale") or {}
    settings = SimSettings(
        fleet={str(k): int(v) for k, v in (data.get("fleet") or {}).items()},
        isolated=IsolatedSpec(**iso),
        cold_start_s=float(billing.get("cold_start_s", 60.0)),
        idle_release_s=float(billing.get("idle_release_s", 60.0)),
        target_backlog_s=float(autoscale.get("target_backlog_s", 120.0)),
        min_workers={str(k): int(v) for k, v in (autoscale.get("min_workers") or {}).items()},
        max_wait_s=None if autoscale.get("max_wait_s") is None else float(autoscale["max_wait_s"]),
        noise_sigma=float(data.get("noise_sigma", 0.15)),
        preempt_rate_per_h=float(preempt.get("rate_per_hour", 0.0)),
        restart_s=float(preempt.get("restart_s", 120.0)),
        profile_error={str(k): float(v) for k, v in (data.get("profile_error") or {}).items()},
        max_groups=data.get("max_groups"),
        cpu_runs_gpu_kinds=bool(data.get("cpu_runs_gpu_kinds", False)),
        levers=_levers(data.get("levers") or {}),
    )
    wl = Workload(
        name=str(data.get("name", "workload")),
        seed=int(data.get("seed", 0)),
        settings=settings,
        datasets=datasets,
        templates=templates,
        tenants=tuple(tenants),
        description=str(data.get("description", "")),
    )
    validate(wl)
    return wl


def load_workload(path: str | Path) -> Workload:
    return parse_workload(yaml.safe_load(Path(path).read_text()) or {})


def validate(wl: Workload) -> None:
    errors = []
    if not wl.tenants:
        errors.append("no tenants")
    if not wl.settings.fleet:
        errors.append("no fleet: {class: count} for the shared pool")
    for tname, stages in wl.templates.items():
        seen: set[str] = set()
        for s in stages:
            if s.input not in seen and s.input not in wl.datasets:
                errors.append(f"{tname}.{s.name}: input {s.input!r} is no dataset/earlier stage")
            for a in s.after:
                if a not in seen:
                    errors.append(f"{tname}.{s.name}: after {a!r} is no earlier stage")
            if s.reduce not in ("none", "record", "all"):
                errors.append(f"{tname}.{s.name}: reduce must be none, record or all")
            if s.n < 1:
                errors.append(f"{tname}.{s.name}: n must be >= 1")
            seen.add(s.name)
    for t in wl.tenants:
        for name, _ in t.templates:
            if name not in wl.templates:
                errors.append(f"tenant {t.name}: unknown template {name!r}")
        if t.dedup_scope not in ("global", "tenant", "workflow"):
            errors.append(f"tenant {t.name}: dedup_scope must be global, tenant or workflow")
    for d in wl.datasets.values():
        if not 0.0 <= d.overlap <= 1.0:
            errors.append(f"dataset {d.name}: overlap must be in [0, 1]")
        if d.overlap > 0 and d.shared_pool < 1:
            errors.append(f"dataset {d.name}: overlap > 0 needs a shared_pool")
    if errors:
        raise ValueError("invalid workload: " + "; ".join(errors))


# --- instances ----------------------------------------------------------------------


def _arrival_times(a: ArrivalSpec, rng: random.Random) -> list[float]:
    rate_s = a.rate_per_h / 3600.0
    end = math.inf if a.count is not None or a.duration_s is None else a.start_s + a.duration_s
    limit = a.count if a.count is not None else 10**9
    times: list[float] = []
    if rate_s <= 0:
        return times
    if a.process == "uniform":
        t = a.start_s
        while len(times) < limit and t < end:
            times.append(t)
            t += 1.0 / rate_s
        return times
    if a.process == "poisson":
        t = a.start_s
        while len(times) < limit:
            t += rng.expovariate(rate_s)
            if t >= end:
                break
            times.append(t)
        return times
    if a.process == "onoff":
        return _onoff_times(a, rate_s, end, limit, rng)
    # bursty: bursts arrive as a Poisson process; each holds burst_size workflows
    t = a.start_s
    size = max(1, a.burst_size)
    while len(times) < limit:
        t += rng.expovariate(rate_s / size)
        if t >= end:
            break
        for _ in range(min(size, limit - len(times))):
            times.append(t + rng.uniform(0.0, a.burst_spread_s))
    return sorted(times)


def _onoff_times(
    a: ArrivalSpec, rate_s: float, end: float, limit: int, rng: random.Random
) -> list[float]:
    """On/off bursts: the mean rate `rate_s`, `peak` times it while on."""
    period = a.on_s + a.off_s
    on_rate = rate_s * a.peak
    off_rate = max(0.0, rate_s * period - on_rate * a.on_s) / max(a.off_s, 1e-9)
    times: list[float] = []
    t = a.start_s
    while len(times) < limit and t < end:
        phase = (t - a.start_s) % period
        on = phase < a.on_s
        rate = on_rate if on else off_rate
        boundary = t + ((a.on_s - phase) if on else (period - phase))
        if rate <= 0:
            t = boundary
            continue
        nxt = t + rng.expovariate(rate)
        if nxt >= boundary:
            t = boundary
            continue
        t = nxt
        if t < end:
            times.append(t)
    return times


def _zipf_sample(pool: int, k: int, s: float, rng: random.Random) -> list[int]:
    """k distinct records of a pool of `pool`, record i drawn with weight 1 / (i+1)^s
    (a few popular records most workflows touch, a long tail)."""
    k = min(k, pool)
    # weighted sampling without replacement (Efraimidis-Spirakis): the k largest u^(1/w)
    keys = [rng.random() ** ((i + 1) ** s) for i in range(pool)]
    return sorted(range(pool), key=lambda i: -keys[i])[:k]


def instances(wl: Workload) -> list[WorkflowInstance]:
    """Every workflow of the workload: arrival times, templates and record draws, all
    from the workload's seed (the same for every policy)."""
    out: list[WorkflowInstance] = []
    for ti, tenant in enumerate(wl.tenants):
        rng = random.Random(f"{wl.seed}:tenant:{ti}:{tenant.name}")
        names = [n for n, _ in tenant.templates]
        weights = [w for _, w in tenant.templates]
        private_seq: dict[str, int] = {}
        for r, t in enumerate(_arrival_times(tenant.arrivals, rng)):
            tmpl = names[0] if len(names) == 1 else rng.choices(names, weights)[0]
            wid = f"{tenant.name}/{tmpl}/{r}"
            used = {s.input for s in wl.templates[tmpl] if s.input in wl.datasets}
            records: dict[str, tuple[str, ...]] = {}
            for ds_name in sorted(used):
                ds = wl.datasets[ds_name]
                overlap = ds.overlap if tenant.overlap is None else tenant.overlap
                n_shared = min(round(overlap * ds.records), ds.shared_pool)
                if ds.draw == "sequential":
                    start = r * n_shared
                    shared = [(start + j) % ds.shared_pool for j in range(n_shared)]
                elif ds.draw == "zipf":
                    shared = _zipf_sample(ds.shared_pool, n_shared, ds.zipf_s, rng)
                else:
                    shared = rng.sample(range(ds.shared_pool), n_shared)
                ids = [f"{ds_name}:shared:{i}" for i in shared]
                n_private = ds.records - n_shared
                if ds.private_pool:
                    picks = rng.sample(range(ds.private_pool), min(n_private, ds.private_pool))
                    ids += [f"{ds_name}:{tenant.name}:{i}" for i in picks]
                else:
                    base = private_seq.get(ds_name, 0)
                    ids += [f"{ds_name}:{tenant.name}:{base + j}" for j in range(n_private)]
                    private_seq[ds_name] = base + n_private
                records[ds_name] = tuple(ids)
            out.append(WorkflowInstance(wid, tenant.name, tmpl, r, t, records, tenant.deadline_s))
    out.sort(key=lambda w: (w.arrival, w.id))
    return out


# --- expansion into operators ---------------------------------------------------------


class Stage:
    """One stage of one running workflow."""

    __slots__ = (
        "after_left",
        "batch_key",
        "dependents",
        "executor",
        "feeds",
        "input_bytes",
        "kind",
        "model",
        "model_gb",
        "name",
        "near",
        "ops",
        "readied",
        "remaining",
        "spec",
        "started",
        "unstarted_inputs",
    )

    def __init__(self, spec: StageSpec, model: str | None) -> None:
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.executor = f"{spec.kind}@sim1"
        self.model = model
        self.model_gb = spec.model_gb if model else 0.0
        self.input_bytes = spec.input_bytes
        params = json.dumps(spec.params, sort_keys=True, default=str)
        self.batch_key = digest("batch", self.executor, model or "", params)
        self.ops: list[Op] = []
        self.remaining = 0
        self.after_left = len(spec.after)
        self.dependents: list[Stage] = []
        # the simulator's forecast of work soon ready: the stages this one's start brings
        # near (those it is the input or an `after` of), how many of its own inputs have
        # not started, whether one of its operators has been ready, whether its work not
        # ready yet counts as soon ready, and how many of its operators have been ready
        self.feeds: list[Stage] = []
        self.unstarted_inputs = 0
        self.started = False
        self.near = False
        self.readied = 0


class Op:
    """One operator of one workflow: `key` is its dedup key (salted by scope)."""

    __slots__ = ("children", "content", "deps_left", "done", "key", "run", "stage")

    def __init__(self, run: WorkflowRun, stage: Stage, content: str, key: str) -> None:
        self.run = run
        self.stage = stage
        self.content = content
        self.key = key
        self.deps_left = 0
        self.children: list[Op] = []
        self.done = False


class WorkflowRun:
    __slots__ = (
        "completed_at",
        "deadline_s",
        "instance",
        "ops",
        "remaining",
        "stages",
        "tenant",
        "wid",
    )

    def __init__(self, instance: WorkflowInstance) -> None:
        self.instance = instance
        self.deadline_s = instance.deadline_s
        self.wid = instance.id
        self.tenant = instance.tenant
        self.stages: list[Stage] = []
        self.ops: list[Op] = []
        self.remaining = 0
        self.completed_at: float | None = None


def expand(wl: Workload, inst: WorkflowInstance) -> WorkflowRun:
    """The operator DAG of one workflow (deps wired, nothing ready yet)."""
    tenant = next(t for t in wl.tenants if t.name == inst.tenant)
    fmt = {**tenant.vars, "tenant": inst.tenant, "workflow": inst.id, "round": str(inst.round)}
    salt = {
        "global": "",
        "tenant": f"tenant:{inst.tenant}",
        "workflow": f"workflow:{inst.id}",
    }[tenant.dedup_scope]
    run = WorkflowRun(inst)
    by_name: dict[str, Stage] = {}
    # per stage: output items as (content id, source record index, producing op)
    outputs: dict[str, list[tuple[str, int, Op | None]]] = {}
    for name, ids in inst.records.items():
        outputs[name] = [(digest("record", rid), i, None) for i, rid in enumerate(ids)]
    for spec in wl.templates[inst.template]:
        model = spec.model.format(**fmt) if spec.model else None
        stage = Stage(spec, model)
        by_name[spec.name] = stage
        run.stages.append(stage)
        for a in spec.after:
            by_name[a].dependents.append(stage)
        for up in sorted({spec.input, *spec.after} & by_name.keys() - {spec.name}):
            by_name[up].feeds.append(stage)
            stage.unstarted_inputs += 1
        after_id = (
            digest("after", *(op.content for a in spec.after for op in by_name[a].ops))
            if spec.after
            else ""
        )
        private = f"private:{inst.id}" if spec.private else ""
        params = json.dumps(spec.params, sort_keys=True, default=str)
        head = (spec.kind, stage.executor, model or "", params, after_id, private)
        src = outputs[spec.input]
        groups: list[tuple[int, Sequence[tuple[str, int, Op | None]]]]
        if spec.reduce == "none":
            groups = [(item[1], [item]) for item in src]
        elif spec.reduce == "record":
            by_rec: dict[int, list[tuple[str, int, Op | None]]] = {}
            for item in src:
                by_rec.setdefault(item[1], []).append(item)
            groups = list(by_rec.items())
        else:
            groups = [(0, src)]
        out: list[tuple[str, int, Op | None]] = []
        for rec, inputs in groups:
            in_ids = [c for c, _, _ in inputs]
            parents = [p for _, _, p in inputs if p is not None]
            for sample in range(spec.n):
                content = digest(*head, str(sample), *in_ids)
                key = digest(content, salt) if salt else content
                op = Op(run, stage, content, key)
                op.deps_left = len(parents)
                for p in parents:
                    p.children.append(op)
                stage.ops.append(op)
                run.ops.append(op)
                out.append((content, rec, op))
        stage.remaining = len(stage.ops)
        outputs[spec.name] = out
    run.remaining = len(run.ops)
    return run
