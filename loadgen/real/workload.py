"""Real-execution workloads: tenants, workflow templates, a shared dataset pool.

A workload YAML (configs/workloads/real-*.yaml) says who submits what and when:

    name: real-8tenants
    seed: 7
    model: tiny-llama        # the model source workers serve (flowmesh-worker --model)
    workers: 8               # worker processes in every mode (see modes.py for the split)
    duration_s: 300          # submissions after this are dropped; the run waits for the rest
    pool: {records: 12, overlap: 0.5, shared: 6}
    templates:
      answer:
        - {name: answers, op: generate, model: tiny-llama, input: data, params: {...}}
    defaults: {template: answer, arrivals: {process: poisson, rate_per_min: 30, count: 1}}
    tenants: [{name: acme}, {name: bravo, arrivals: {start_s: 5}}]

Every workflow reads one dataset, `data`, of `pool.records` prompts: a fraction
`pool.overlap` of them drawn from a pool of `pool.shared` prompts all tenants draw from
(the same questions many RLHF rounds and tenants ask), the rest its own. Overlap is what
dedup can save; the rest is work every mode must do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from flowmesh.engine.spec import SpecError, parse_spec
from flowmesh.topics.messages import DedupScope, WorkflowSpec

Process = Literal["poisson", "bursty", "uniform"]

TOPICS = ("math", "history", "science", "geography", "language", "music", "sport", "art")


class Arrivals(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """When one tenant submits: `count` workflows from `start_s`, at `rate_per_min` on
    average; bursty sends them `burst` at a time."""

    process: Process = "poisson"
    rate_per_min: float = 30.0
    count: int = 1
    start_s: float = 0.0
    burst: int = 4


class Pool(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    records: int = 12  # per workflow
    overlap: float = 0.5  # fraction of a workflow's records from the shared pool
    shared: int | None = None  # size of the shared pool (default: the shared records)
    field: str = "prompt"


class TenantSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    template: str | None = None
    arrivals: dict[str, Any] = {}


class Defaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    template: str | None = None
    arrivals: dict[str, Any] = {}


class WorkloadFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    templates: dict[str, list[dict[str, Any]]]
    tenants: list[TenantSpec]
    seed: int = 1
    model: str = "tiny-llama"
    workers: int = 2
    duration_s: float = 600.0
    pool: Pool = Pool()
    defaults: Defaults = Defaults()
    # keys over configs/scheduler/default.yaml for every engine of the run (linger_s...)
    scheduler: dict[str, Any] = {}


@dataclass(frozen=True)
class Submission:
    """One workflow of the run: who submits it, when (seconds after the start), what."""

    workflow_id: str
    tenant: str
    at_s: float
    template: str
    spec: WorkflowSpec

    def scoped(self, dedup_scope: DedupScope) -> WorkflowSpec:
        s = self.spec
        return WorkflowSpec(
            name=s.name,
            nodes=s.nodes,
            datasets=s.datasets,
            tenant=s.tenant,
            dedup_scope=dedup_scope,
        )


@dataclass
class RealWorkload:
    name: str
    seed: int
    model: str
    workers: int
    duration_s: float
    pool: Pool
    tenants: list[str]
    submissions: list[Submission] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def records_per_workflow(self) -> int:
        return self.pool.records


def _prompt(i: int, owner: str) -> dict[str, Any]:
    topic = TOPICS[i % len(TOPICS)]
    return {"topic": topic, "text": f"{owner} question {i} about {topic}: explain it briefly."}


def dataset(pool: Pool, rng: random.Random, owner: str) -> list[dict[str, Any]]:
    """One workflow's records: round(records * overlap) from the shared pool, drawn
    without replacement, the rest unique to `owner` (tenant + workflow)."""
    n_shared = round(pool.records * pool.overlap)
    size = max(pool.shared or n_shared, n_shared)
    picks = sorted(rng.sample(range(size), n_shared))
    records = [_prompt(i, "shared") for i in picks]
    records += [_prompt(i, owner) for i in range(pool.records - n_shared)]
    rng.shuffle(records)
    # the pool's field name, so a template can read `prompt` or whatever it says
    return [{"topic": r["topic"], pool.field: r["text"]} for r in records]


def arrival_times(a: Arrivals, rng: random.Random) -> list[float]:
    mean_gap = 60.0 / a.rate_per_min
    times, t = [], a.start_s
    if a.process == "uniform":
        return [a.start_s + i * mean_gap for i in range(a.count)]
    if a.process == "poisson":
        for _ in range(a.count):
            times.append(t)
            t += rng.expovariate(1.0 / mean_gap)
        return times
    # bursty: `burst` at once, then a pause that keeps the same average rate
    while len(times) < a.count:
        times += [t] * min(a.burst, a.count - len(times))
        t += rng.expovariate(1.0 / (mean_gap * a.burst))
    return times


def _arrivals(defaults: dict[str, Any], own: dict[str, Any], where: str) -> Arrivals:
    try:
        a = msgspec.convert({**defaults, **own}, Arrivals)
    except msgspec.ValidationError as exc:
        raise SpecError([f"{where}: arrivals: {exc}"]) from exc
    if a.rate_per_min <= 0 or a.count < 0 or a.burst < 1 or a.start_s < 0:
        raise SpecError([f"{where}: arrivals need rate_per_min > 0, count >= 0, burst >= 1"])
    return a


def build(doc: WorkloadFile) -> RealWorkload:
    problems = []
    if not doc.tenants:
        problems.append("a workload needs at least one tenant")
    if doc.workers < 1:
        problems.append("workers must be at least 1")
    if not 0.0 <= doc.pool.overlap <= 1.0:
        problems.append("pool.overlap must be in [0, 1]")
    if doc.pool.records < 1:
        problems.append("pool.records must be at least 1")
    names = [t.name for t in doc.tenants]
    if len(set(names)) != len(names):
        problems.append("tenant names must be unique")
    if problems:
        raise SpecError(problems)
    rng = random.Random(doc.seed)
    wl = RealWorkload(
        name=doc.name,
        seed=doc.seed,
        model=doc.model,
        workers=doc.workers,
        duration_s=doc.duration_s,
        pool=doc.pool,
        tenants=names,
        scheduler=dict(doc.scheduler),
    )
    for tenant in doc.tenants:
        where = f"tenant {tenant.name!r}"
        tpl_name = tenant.template or doc.defaults.template
        if tpl_name is None or tpl_name not in doc.templates:
            known = ", ".join(doc.templates) or "none"
            raise SpecError([f"{where}: unknown template {tpl_name!r} (templates: {known})"])
        arrivals = _arrivals(doc.defaults.arrivals, tenant.arrivals, where)
        for i, at in enumerate(arrival_times(arrivals, rng)):
            if at > doc.duration_s:
                break
            wf_id = f"{doc.name}-{tenant.name}-{i}"[:64]
            records = dataset(doc.pool, rng, f"{tenant.name}/{i}")
            try:
                spec = parse_spec(
                    {
                        "name": f"{tpl_name}-{tenant.name}-{i}",
                        "tenant": tenant.name,
                        "datasets": {"data": {"records": records}},
                        "nodes": doc.templates[tpl_name],
                    }
                )
            except SpecError as exc:
                raise SpecError([f"template {tpl_name!r}: {p}" for p in exc.problems]) from exc
            wl.submissions.append(Submission(wf_id, tenant.name, at, tpl_name, spec))
    wl.submissions.sort(key=lambda s: (s.at_s, s.workflow_id))
    if not wl.submissions:
        raise SpecError(["the workload submits no workflow (count 0, or all after duration_s)"])
    return wl


def load_real_workload(path: str | Path, **overrides: Any) -> RealWorkload:
    """Read and check a workload YAML; `overrides` replace top-level keys (None: keep)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([f"cannot read {path}: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: a workload is a mapping"])
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "overlap":
            raw["pool"] = {**raw.get("pool", {}), "overlap": value}
        elif key == "records":
            raw["pool"] = {**raw.get("pool", {}), "records": value}
        elif key == "tenants":
            raw["tenants"] = (raw.get("tenants") or [])[:value]
        else:
            raw[key] = value
    try:
        doc = msgspec.convert(raw, WorkloadFile)
    except msgspec.ValidationError as exc:
        raise SpecError([f"{path}: {exc}"]) from exc
    return build(doc)
