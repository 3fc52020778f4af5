"""The scheduling policy: from a snapshot of ready operators and workers, the batches to
run and where, chosen by the utility function. Pure over its inputs (time is an
argument), so the live scheduler and the simulator make exactly the same decisions.

One round: ready operators are grouped by batch key (same executor build, params and
model, from any workflow); every (worker, group) pair is scored at the batch size the
worker's class takes (limited by its profile and the group's size); the best pair is
assigned; the scores of that worker and that group are refreshed; repeat until no free
worker has a feasible group. (The refresh and the pick are engine/scheduler/rescore.py:
the group's scores in plain floats, the best pair kept per group; same numbers, same
pairs as numpy's scores and an argmax over every pair.) A worker may hold several
models (memory-aware: loading one evicts least-recently-used ones until it fits; a model
larger than the device never goes there), and warm workers win through the locality
term.

Cold workers (`startup_s`: a cold start or an allocation before they can run anything)
are priced with it (time, $ at their rate, idle energy). One-off costs are shared by the
work that pays them off: a model load by the worker's share of that group's backlog, a
startup by its share of all the backlog it could run (it serves more than one batch once
up), so a cold fast class is not beaten by a cold slow one on one batch's startup alone.
Cold workers do not count as idle capacity when a backlog is spread.

With `hold_s > 0`, busy workers that free within `hold_s` (`busy_until`, not overdue)
are scored too, as if free then (the wait counts in their time, not their cost): a batch
one wins is held for it (not assigned this round), so a slow free worker is left idle
when a faster one frees soon enough to run the batch sooner and better.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flowmesh.engine.scheduler.fairness import FairShare, TenantPolicy
from flowmesh.engine.scheduler.fleet import Fleet, LatencyEstimator
from flowmesh.engine.scheduler.groups import ReadyGroup, ReadyItem, group_ready
from flowmesh.engine.scheduler.rescore import BestPerGroup, Floats, score_column
from flowmesh.engine.scheduler.utility import (
    TERMS,
    Weights,
    batch_totals,
    estimate,
    terms,
    utility,
)

__all__ = [
    "Decision",
    "Policy",
    "PolicyConfig",
    "ReadyGroup",
    "ReadyItem",
    "WorkerState",
    "load_policy_config",
    "parse_policy_config",
]

NEG = -math.inf
_Refs = tuple[np.ndarray, np.ndarray, np.ndarray]  # per kind: ops/s, $/op, J/op
_tenant = attrgetter("tenant")


@dataclass
class WorkerState:
    id: str
    device_class: str
    free_slots: int
    resident: dict[str, float] = field(default_factory=dict)  # model -> GB, LRU first
    executors: frozenset[str] | None = None  # "executor@version" it runs; None: any
    models: frozenset[str] | None = None  # models it can load; None: any
    batch_caps: Mapping[str, int] | None = None  # "executor@version" -> largest batch
    startup_s: float = 0.0  # before it can start a batch: cold start / allocation (billed)
    busy_until: float | None = None  # with no free slot: when one is expected to free


@dataclass(frozen=True)
class Decision:
    worker: str
    device_class: str
    items: tuple[ReadyItem, ...]
    score: float
    terms: Mapping[str, float]
    seconds: float
    cost_usd: float
    energy_j: float
    load_model: str | None  # a model it must load first
    evict: tuple[str, ...]  # resident models it drops to make room


@dataclass(frozen=True)
class PolicyConfig:
    weights: Weights = field(default_factory=Weights)
    linger_s: float = 0.0  # hold a group smaller than a full batch up to this long (the
    # shipped configs/scheduler/default.yaml sets 0.25 s; unit tests decide at once)
    aging_scale_s: float = 60.0
    # smallest batch worth splitting a backlog into: fixed overhead <= 1 - this share
    spread_efficiency: float = 0.75
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)
    # reference model size per kind: a model of this size runs at the profiled speed
    ref_model_gb: Mapping[str, float] = field(default_factory=dict)
    # hold a batch for a busy worker that frees within this long when it would run it
    # sooner and better than a free one (0: every free worker gets work when it can)
    hold_s: float = 0.0
    # the elastic pool (engine/scheduler/rightsize.py): "fixed" releases an idle worker
    # after the pool's idle_release_s; "forecast" releases it at once unless the
    # accepted workflows' remaining work needs it within the break-even horizon
    release: str = "fixed"
    # "backlog": grow to backlog / target_backlog_s workers; "after-startup": count only
    # the backlog the allocated workers will not have done when a new one is up
    scale_up: str = "backlog"
    # latency budgets: a batch whose workflow has a deadline weighs throughput by
    # deadline_scale_s / time left (within [0.1, 4]): with hours of slack cost decides
    # (throughput work goes to cheap classes), near the deadline speed does
    deadline_scale_s: float = 600.0
    # a tenant this far below its fair share (deficit log(due/got) >= this; 1.0: it got
    # under 37% of its due) has its operators taken out of a batch key's group shared
    # with others into a batch of their own: in the shared group they sit behind the
    # backlog's older operators and, once picked, wait for a 256-operator batch to end
    # (one done message per batch). inf: never split
    split_deficit: float = 1.0
    # added to the utility of such a tenant's batch: it is served first, whatever its
    # size. The fairness term alone (at most +4.6) did not outweigh what a batch of 2
    # loses to one of 256 on throughput and cost (about 5 points on a CPU worker): a
    # small workflow waited 6 s for a third operator to arrive (loadgen large)
    split_boost: float = 10.0

    def __post_init__(self) -> None:
        if self.release not in RELEASE_MODES:
            raise ValueError(f"release must be one of {', '.join(RELEASE_MODES)}")
        if self.scale_up not in SCALE_UP_MODES:
            raise ValueError(f"scale_up must be one of {', '.join(SCALE_UP_MODES)}")
        if self.linger_s < 0 or self.hold_s < 0:
            raise ValueError("linger_s and hold_s must be >= 0")


RELEASE_MODES = ("fixed", "forecast")
SCALE_UP_MODES = ("backlog", "after-startup")


def parse_policy_config(data: Mapping[str, Any]) -> PolicyConfig:
    """configs/scheduler/*.yaml: weights, linger_s, aging_scale_s, spread_efficiency,
    hold_s, release, scale_up, split_deficit, tenants: {name: {weight, priority, budget_usd}}."""
    weights = Weights(**(data.get("weights") or {}))
    tenants = {name: TenantPolicy(**(t or {})) for name, t in (data.get("tenants") or {}).items()}
    return PolicyConfig(
        weights=weights,
        tenants=tenants,
        linger_s=float(data.get("linger_s", PolicyConfig.linger_s)),
        aging_scale_s=float(data.get("aging_scale_s", 60.0)),
        spread_efficiency=float(data.get("spread_efficiency", 0.75)),
        hold_s=float(data.get("hold_s", 0.0)),
        release=str(data.get("release", "fixed")),
        scale_up=str(data.get("scale_up", "backlog")),
        deadline_scale_s=float(data.get("deadline_scale_s", 600.0)),
        split_deficit=float(data.get("split_deficit", PolicyConfig.split_deficit)),
        split_boost=float(data.get("split_boost", PolicyConfig.split_boost)),
    )


def load_policy_config(path: str | Path) -> PolicyConfig:
    return parse_policy_config(yaml.safe_load(Path(path).read_text()) or {})


class Policy:
    def __init__(
        self,
        fleet: Fleet,
        config: PolicyConfig | None = None,
        estimator: LatencyEstimator | None = None,
    ) -> None:
        self.fleet = fleet
        self.config = config or PolicyConfig()
        self.estimator = estimator or LatencyEstimator(fleet)
        self.classes = list(fleet.classes)
        self.kinds = list(fleet.kinds)
        self._class_idx = {c: i for i, c in enumerate(self.classes)}
        self._kind_idx = {k: i for i, k in enumerate(self.kinds)}
        cls = [fleet.classes[c] for c in self.classes]
        self.price = np.array([c.price_per_hour for c in cls])
        self.watts = np.array([c.watts_busy for c in cls])
        self.watts_idle = np.array([c.watts_idle for c in cls])
        self.load_gbps = np.array([c.load_gbps for c in cls])
        self.net_gbps = np.array([c.net_gbps for c in cls])
        self.memory = np.array([c.memory_gb for c in cls])
        self.min_sf = np.array([c.min_size_factor for c in cls])
        self._ref_model_gb = {**fleet.ref_model_gb, **self.config.ref_model_gb}
        # per class, as rescore.Floats has them (the fleet does not change)
        self._class_floats = {
            "c_load": np.maximum(self.load_gbps, 1e-9).tolist(),
            "c_fetch": np.maximum(self.net_gbps * 1.25e8, 1.0).tolist(),
            "c_net": self.net_gbps.tolist(),
            "c_price": self.price.tolist(),
            "c_watts": self.watts.tolist(),
            "c_watts_idle": self.watts_idle.tolist(),
            "c_min_sf": self.min_sf.tolist(),
        }
        self._tables_at: int | None = None  # estimator version the tables were read at
        self._fixed = self._per = self._maxb = np.zeros(0)
        self._refs: _Refs = (np.ones(0), np.ones(0), np.ones(0))

    def size_factor(self, kind: str, model_gb: float, device_class: str) -> float:
        """How a model's size scales a batch's time on a class, relative to the profile
        (the same factor decide() applies): observed times are divided by it before the
        estimator learns from them, so they are not scaled twice."""
        ref = self._ref_model_gb.get(kind, 0.0)
        raw = model_gb / ref if model_gb > 0 and ref > 0 else 1.0
        return max(raw, self.fleet.classes[device_class].min_size_factor)

    # --- per round tables -----------------------------------------------------------

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Refs]:
        """(class, kind) latency tables and per-kind references, refreshed only for the
        kinds whose estimates moved since the last round."""
        est = self.estimator
        if self._tables_at is None:
            shape = (len(self.classes), max(1, len(self.kinds)))
            self._fixed, self._per, self._maxb = np.zeros(shape), np.zeros(shape), np.zeros(shape)
            self._refs = (np.ones(shape[1]), np.ones(shape[1]), np.ones(shape[1]))
            stale = list(range(len(self.kinds)))
        else:
            seen, idx = self._tables_at, self._kind_idx
            stale = [idx[k] for k, v in est.changed.items() if v > seen and k in idx]
        for ki in stale:
            self._refresh_kind(ki)
        self._tables_at = est.version
        return self._fixed, self._per, self._maxb, self._refs

    def _refresh_kind(self, ki: int) -> None:
        k = self.kinds[ki]
        fixed, per, maxb = self._fixed, self._per, self._maxb
        for ci, c in enumerate(self.classes):
            m = self.estimator.model(c, k)
            if m is not None:
                fixed[ci, ki], per[ci, ki], maxb[ci, ki] = m.fixed_s, m.per_item_s, m.max_batch
        # the geometric mean over the classes that run the kind (full batch, warm): what
        # a 'typical' device does, so terms of different kinds are comparable
        can = maxb[:, ki] > 0
        if not can.any():
            return
        n = maxb[can, ki]
        secs = fixed[can, ki] + per[can, ki] * n
        ops, cost, energy = self._refs
        ops[ki] = math.exp(float(np.mean(np.log(n / secs))))
        cost[ki] = math.exp(float(np.mean(np.log(secs * self.price[can] / 3600 / n))))
        energy[ki] = math.exp(float(np.mean(np.log(secs * self.watts[can] / n))))

    # --- the round ------------------------------------------------------------------

    def decide(
        self,
        items: Sequence[ReadyItem],
        workers: Sequence[WorkerState],
        now: float,
        fair: FairShare | None = None,
    ) -> list[Decision]:
        """One round over a flat list of ready operators (grouped here by batch key)."""
        return self.decide_groups(group_ready(items), workers, now, fair)

    def decide_groups(
        self,
        groups: Sequence[ReadyGroup],
        workers: Sequence[WorkerState],
        now: float,
        fair: FairShare | None = None,
    ) -> list[Decision]:
        """One round over ready operators kept grouped by batch key (each group oldest
        first, groups by their oldest operator). The groups are not changed; the workers'
        `free_slots` and `resident` models are updated with what was assigned."""
        fair = fair or FairShare(self.config.tenants)
        free, soon = self._available(workers, now)
        if not free:
            return []
        eligible = self._eligible(groups, fair)
        if not eligible:
            return []
        # read once: splitting a group moves operators, not tenants
        tenants = set().union(*(g.tenants for g in eligible))
        deficits = fair.deficits(tenants, now)
        eligible = self._split_under_share(eligible, fair, tenants, deficits)
        rnd = self._round_tables(eligible, free, soon, now, fair, tenants, deficits)
        self._score_all(rnd)
        return self._assign(rnd, fair, now)

    def _available(
        self, workers: Sequence[WorkerState], now: float
    ) -> tuple[list[WorkerState], list[WorkerState]]:
        """Workers with a free slot, and (with hold_s) busy ones that free soon: scored
        as if free then; what they win is held, not assigned."""
        cls = self._class_idx
        free = [w for w in workers if w.free_slots > 0 and w.device_class in cls]
        hold = self.config.hold_s
        soon = (
            [
                w
                for w in workers
                if w.free_slots <= 0
                and w.busy_until is not None
                and 0 <= w.busy_until - now <= hold  # overdue: no telling when
                and w.device_class in cls
            ]
            if hold > 0
            else []
        )
        return free, soon

    def _eligible(self, groups: Sequence[ReadyGroup], fair: FairShare) -> list[ReadyGroup]:
        """Groups of kinds the fleet runs, less the operators of tenants over budget
        (they wait; they are not dropped)."""
        budgets = any(p.budget_usd is not None for p in fair.policies.values())
        out: list[ReadyGroup] = []
        trimmed = False
        for g in groups:
            if not g.items or g.items[0].kind not in self._kind_idx:
                continue
            if budgets:
                over = {t for t in g.tenants if fair.over_budget(t)}
                if over:
                    kept = g.without(over)
                    if kept is None:
                        continue
                    g, trimmed = kept, True
            out.append(g)
        if trimmed:
            out.sort(key=lambda g: g.items[0].ready_at)
        return out

    def _split_under_share(
        self,
        groups: list[ReadyGroup],
        fair: FairShare,
        tenants: set[str],
        deficits: Mapping[str, float],
    ) -> list[ReadyGroup]:
        """Groups shared by several tenants, with the operators of tenants far below
        their share (`split_deficit`) moved into a group of their own (one per batch key,
        all such tenants together: they still batch with each other), whose utility gets
        `split_boost`. A group of such tenants alone gets it too. Only groups with such a
        tenant are walked; with fairness off nothing changes."""
        if (
            self.config.weights.fairness <= 0
            or not math.isfinite(self.config.split_deficit)
            or not fair.usage  # nobody has had the fleet: every deficit is 0
        ):
            return groups
        if len(tenants) < 2:
            return groups
        under = {t for t, d in deficits.items() if d >= self.config.split_deficit}
        if not under or len(under) == len(tenants):
            return groups
        out: list[ReadyGroup] = []
        split = False
        for g in groups:
            mine = under.intersection(g.tenants)
            if not mine:
                out.append(g)
                continue
            boost = self.config.split_boost
            if len(mine) == len(g.tenants):
                out.append(dataclasses.replace(g, boost=boost))
                continue
            served = ReadyGroup.of([i for i in g.items if i.tenant in mine])
            rest = g.without(mine)
            out.append(dataclasses.replace(served, boost=boost))
            if rest is not None:
                out.append(rest)
            split = True
        if split:
            out.sort(key=lambda g: g.items[0].ready_at)
        return out

    def _round_tables(
        self,
        groups: list[ReadyGroup],
        free: list[WorkerState],
        soon: list[WorkerState],
        now: float,
        fair: FairShare,
        tenants: set[str],
        deficits: Mapping[str, float],
    ) -> _Round:
        """What does not change within the round: per group, per worker type (workers
        alike in all but their resident models), and which types can run which group."""
        # copies: the tables move with the estimator, and a decision's terms are read
        # later from this round's state
        fixed, per, maxb, (ops, cost, energy) = self._tables()
        fixed_t, per_t, maxb_t = fixed.copy(), per.copy(), maxb.copy()
        refs = (ops.copy(), cost.copy(), energy.copy())
        heads = [g.items[0] for g in groups]
        G = len(groups)
        kind = np.array([self._kind_idx[h.kind] for h in heads])
        model_gb = np.array([h.model_gb if h.model else 0.0 for h in heads])
        ref_gb = np.array([self._ref_model_gb.get(h.kind, 0.0) for h in heads])
        size_factor = np.where(
            (model_gb > 0) & (ref_gb > 0), model_gb / np.maximum(ref_gb, 1e-9), 1.0
        )
        sizes = [len(g.items) for g in groups]
        in_bytes = np.array([g.input_bytes / n for g, n in zip(groups, sizes, strict=True)])
        n_g = np.array(sizes, dtype=float)
        oldest = now - np.array([h.ready_at for h in heads])
        prio = {t: fair.policy(t).priority for t in tenants}
        if len(set(prio.values())) <= 1:  # all alike (usually 0): no walk over groups
            priority = np.full(G, next(iter(prio.values()), 0.0))
        else:
            priority = np.array([max(prio[t] for t in g.tenants) for g in groups])
        priority = priority + np.array([g.boost for g in groups])
        if len(set(deficits.values())) <= 1:
            deficit = np.full(G, next(iter(deficits.values()), 0.0))
        else:  # the mean over the group's operators
            deficit = np.array(
                [
                    sum(deficits[t] * c for t, c in g.tenants.items()) / n
                    for g, n in zip(groups, sizes, strict=True)
                ]
            )
        models = sorted({h.model for h in heads if h.model})
        m_idx = {m: j for j, m in enumerate(models)}
        g_model = np.array([m_idx.get(h.model or "", -1) for h in heads])
        execs = sorted({h.executor for h in heads})
        e_idx = {e: j for j, e in enumerate(execs)}
        g_exec = np.array([e_idx[h.executor] for h in heads])

        rows_w = free + soon
        n_free = len(free)
        types: dict[tuple[Any, ...], int] = {}
        specimens: list[tuple[WorkerState, bool, float, float]] = []
        type_list: list[int] = []
        for i, w in enumerate(rows_w):
            is_free = i < n_free
            caps = tuple(sorted(w.batch_caps.items())) if w.batch_caps else None
            # free: its startup; held: its wait (0 for the other)
            when = w.startup_s if is_free else w.busy_until
            key = (w.device_class, is_free, when, w.executors, w.models, caps)
            t = types.get(key)
            if t is None:
                t = types[key] = len(specimens)
                startup = max(0.0, w.startup_s) if is_free else 0.0
                wait = 0.0 if is_free else max(0.0, (w.busy_until or now) - now)
                specimens.append((w, is_free, startup, wait))
            type_list.append(t)
        type_of = np.array(type_list, dtype=np.int64)
        T = len(specimens)
        t_ci = np.array([self._class_idx[s[0].device_class] for s in specimens])
        t_free = np.array([s[1] for s in specimens])
        t_startup = np.array([s[2] for s in specimens])
        t_wait = np.array([s[3] for s in specimens])
        compat = (maxb_t[t_ci][:, kind] > 0) & (model_gb[None, :] <= self.memory[t_ci][:, None])
        cap = np.full((T, G), np.inf)
        for t, (w, *_rest) in enumerate(specimens):
            if w.executors is not None:
                compat[t] &= np.array([e in w.executors for e in execs])[g_exec]
            if w.models is not None:
                known = np.array([m in w.models for m in models] + [True])
                compat[t] &= known[g_model]
            if w.batch_caps:
                largest = [float(w.batch_caps.get(e, np.inf)) for e in execs]
                cap[t] = np.array(largest)[g_exec]
        # the work a new worker is expected to do once up: its share of all the backlog
        # it could run (with the idle workers), in seconds on its class at full batches
        c2, kk = t_ci[:, None], kind[None, :]
        full = np.maximum(maxb_t[c2, kk], 1)
        work = (
            np.ceil(n_g[None, :] / full) * fixed_t[c2, kk] + n_g[None, :] * per_t[c2, kk]
        ) * np.maximum(size_factor[None, :], self.min_sf[t_ci][:, None])
        t_ready = (t_startup <= 0) & t_free
        ready_w = t_ready[type_of]
        n_idle = int(ready_w.sum())
        backlog = np.where(compat, work, 0.0).sum(axis=1) / (n_idle + 1)
        # idle capacity a backlog is spread over: free now (not cold, not busy)
        per_type_ready = np.bincount(type_of[ready_w], minlength=T)
        idle = (compat * per_type_ready[:, None]).sum(axis=0)
        resident = np.zeros((len(rows_w), len(models) + 1), dtype=bool)
        resident[:, -1] = True  # "no model" is always warm
        if models:
            for wi, w in enumerate(rows_w):
                for m in w.resident:
                    j = m_idx.get(m)
                    if j is not None:
                        resident[wi, j] = True
        warm = resident[:, g_model]
        slots = np.array([w.free_slots if i < n_free else 1 for i, w in enumerate(rows_w)])
        # per worker variant v (type v // 2; the group's model resident when v is odd):
        # (V, 1) columns, (1, G) rows and (V, G) tables, so a refresh slices views
        vt = np.repeat(np.arange(T), 2)
        vc = t_ci[vt][:, None]
        kk = kind[None, :]
        e = self.config.spread_efficiency
        v_per = per_t[vc, kk]
        v_fixed = fixed_t[vc, kk]
        sf_row = size_factor[None, :]
        ref_ops, ref_cost, ref_energy = refs
        return _Round(
            groups=groups,
            taken=[0] * G,
            rows_w=rows_w,
            n_free=n_free,
            fixed_t=fixed_t,
            per_t=per_t,
            maxb_t=maxb_t,
            refs=refs,
            kind=kind,
            model_gb=model_gb,
            size_factor=size_factor,
            in_bytes=in_bytes,
            n_g=n_g.tolist(),
            oldest=oldest.tolist(),
            deficit=deficit,
            priority=priority,
            g_model=g_model,
            m_idx=m_idx,
            type_of=type_of,
            t_ci=t_ci,
            t_startup=t_startup,
            t_wait=t_wait,
            compat=compat,
            compat_n=compat.astype(idle.dtype),
            cap=cap,
            backlog=backlog,
            ready_w=ready_w,
            idle=idle,
            resident=resident,
            warm=warm,
            slots=slots.tolist(),
            scores=np.empty((G, len(rows_w))),
            charges=[],
            tenant_idx={t: i for i, t in enumerate(tenants)},
            vidx=np.ascontiguousarray(np.where(slots > 0, 2 * type_of, 2 * T)[None, :] + warm.T),
            live=np.bincount(type_of[slots > 0], minlength=T).tolist(),
            floats=None,
            g_types={},
            column_buf=np.empty(2 * T + 2),
            best=None,
            v_warm=(np.arange(2 * T) % 2 == 1)[:, None],
            v_startup=t_startup[vt][:, None],
            v_wait=t_wait[vt][:, None],
            v_backlog=backlog[vt][:, None],
            v_load_gbps=self.load_gbps[vc],
            v_net_gbps=self.net_gbps[vc],
            v_price=self.price[vc],
            v_watts=self.watts[vc],
            v_watts_idle=self.watts_idle[vc],
            g_model_gb=model_gb[None, :],
            g_in_bytes=in_bytes[None, :],
            g_ref_ops=ref_ops[kk] / sf_row,
            g_ref_cost=ref_cost[kk] * sf_row,
            g_ref_energy=ref_energy[kk] * sf_row,
            g_deficit=deficit[None, :],
            g_urgency=self._urgency(groups, now)[None, :],
            g_priority=priority[None, :],
            vg_fixed=v_fixed,
            vg_per=v_per,
            vg_maxb=np.minimum(maxb_t[vc, kk], cap[vt]),
            vg_efficient=np.ceil(e * v_fixed / ((1 - e) * np.maximum(v_per, 1e-12)) - 1e-9),
            vg_sfm=np.maximum(sf_row, self.min_sf[vc]),
            vg_compat=compat[vt],
        )

    def _urgency(self, groups: list[ReadyGroup], now: float) -> np.ndarray:
        """Per group, the throughput term's scale from its most pressing deadline:
        deadline_scale_s / time left, within [0.1, 4]; 1 without a deadline."""
        out = np.ones(len(groups))
        scale = self.config.deadline_scale_s
        for gi, g in enumerate(groups):
            if math.isfinite(g.deadline_at):
                left = g.deadline_at - now
                out[gi] = 4.0 if left <= 0 else min(4.0, max(0.1, scale / left))
        return out

    def _score(
        self,
        rnd: _Round,
        rows: slice,
        cols: slice,
        n_g: np.ndarray,
        oldest: np.ndarray,
        idle: np.ndarray,
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Utility of each (worker variant, group) pair in `rows` x `cols`: a variant is a
        worker type with the group's model resident (odd) or not (even). `n_g`, `oldest`
        and `idle` are the current sizes, ages and idle capable workers of those groups."""
        cfg = self.config
        n_col, oldest_col, idle_col = n_g[None, :], oldest[None, :], idle[None, :]
        maxb = rnd.vg_maxb[rows, cols]
        # spread a backlog over the idle workers that could take it (latency), but never
        # into batches so small that fixed overhead dominates (cost); cold workers (they
        # may never be allocated) and busy ones are not idle capacity
        spread = np.ceil(n_col / np.maximum(idle_col, 1))
        n = np.minimum(np.maximum(spread, rnd.vg_efficient[rows, cols]), np.maximum(maxb, 1))
        n = np.maximum(np.minimum(n, n_col), 1)
        # the batches of this group the worker is expected to run: its share of the
        # backlog (a cold one joins the idle ones), over which one-off costs spread
        startup = rnd.v_startup[rows]
        share = n_col / np.maximum(idle_col + (startup > 0), 1)
        runs = np.maximum(share / n, 1.0)
        fixed, per, sfm = rnd.vg_fixed[rows, cols], rnd.vg_per[rows, cols], rnd.vg_sfm[rows, cols]
        batch_s = (fixed + per * n) * sfm
        startup_runs = np.maximum(rnd.v_backlog[rows] / np.maximum(batch_s, 1e-9), runs)
        est = estimate(
            n,
            fixed,
            per,
            sfm,
            rnd.v_warm[rows],
            rnd.g_model_gb[:, cols],
            rnd.v_load_gbps[rows],
            rnd.g_in_bytes[:, cols] * n,
            rnd.v_net_gbps[rows],
            rnd.v_price[rows],
            rnd.v_watts[rows],
            startup_s=startup,
            watts_idle=rnd.v_watts_idle[rows],
            wait_s=rnd.v_wait[rows],
            runs=runs,
            startup_runs=startup_runs,
        )
        # references scale with the model: a small model's batch is compared with what
        # a typical device does for a model of that size, not for the reference one
        parts = terms(
            n,
            est,
            rnd.g_ref_ops[:, cols],
            rnd.g_ref_cost[:, cols],
            rnd.g_ref_energy[:, cols],
            rnd.g_deficit[:, cols],
            oldest_col,
            rnd.g_priority[:, cols],
            cfg.weights,
            cfg.aging_scale_s,
            rnd.g_urgency[:, cols],
        )
        score = utility(parts)
        ok = rnd.vg_compat[rows, cols] & (n_col > 0)
        # linger: a partial batch waits a little for company, unless it is old
        ok &= (n_col >= maxb) | (oldest_col >= cfg.linger_s)
        return np.where(ok, score, NEG), parts, n

    def _score_all(self, rnd: _Round) -> None:
        """Every (worker, group) pair: scored once per worker variant, then spread to
        the workers of that type by whether each holds the group's model. With finite
        inputs (no NaN can arise) the picks read the best pair per group (BestPerGroup)
        and a group is rescored in plain floats (score_column)."""
        every = slice(None)
        n_g, oldest, idle = np.array(rnd.n_g), np.array(rnd.oldest), rnd.idle
        per_variant, _, _ = self._score(rnd, every, every, n_g, oldest, idle)
        # per group, its variants' scores and two more, NEG, that the workers with no
        # slot left read; a flat take (two index arrays cost twice as much)
        G, V = len(rnd.groups), len(rnd.v_warm) + 2
        padded = np.full((G, V), NEG)
        padded[:, : V - 2] = per_variant.T
        rnd.scores = padded.ravel().take(rnd.vidx + (np.arange(G) * V)[:, None])
        if not np.isnan(per_variant).any() and _finite_inputs(rnd):
            rnd.best = BestPerGroup(rnd.scores)

    def _rescore_group(self, rnd: _Round, gi: int) -> None:
        """numpy's path (inputs not all finite); _assign_best rescores in plain floats."""
        if rnd.n_g[gi] <= 0:
            rnd.scores[gi] = NEG
            return
        g = slice(gi, gi + 1)
        n_g, oldest, idle = np.array(rnd.n_g[g]), np.array(rnd.oldest[g]), rnd.idle[g]
        col2, _, _ = self._score(rnd, slice(None), g, n_g, oldest, idle)
        vidx = 2 * rnd.type_of + rnd.warm[:, gi]
        rnd.scores[gi] = np.where(np.array(rnd.slots) > 0, col2[vidx, 0], NEG)

    def _floats(self, rnd: _Round) -> Floats:
        """The round's tables as plain floats, for score_column and the picks (built
        at the first pick: the values _score reads, or the same operations on them)."""
        if rnd.floats is not None:
            return rnd.floats
        w, ci, e = self.config.weights, rnd.t_ci, self.config.spread_efficiency
        fixed, per = rnd.fixed_t, rnd.per_t
        efficient = np.ceil(e * fixed / ((1 - e) * np.maximum(per, 1e-12)) - 1e-9)
        capped = np.isfinite(rnd.cap).any(axis=1).tolist()
        rnd.floats = Floats(
            w_type=rnd.type_of.tolist(),
            t_class=ci.tolist(),
            t_startup=rnd.t_startup.tolist(),
            t_wait=rnd.t_wait.tolist(),
            t_backlog=rnd.backlog.tolist(),
            t_cap=[rnd.cap[t].tolist() if capped[t] else None for t in range(len(ci))],
            **self._class_floats,
            fixed=fixed.tolist(),
            per=per.tolist(),
            maxb=rnd.maxb_t.tolist(),
            efficient=efficient.tolist(),
            g_kind=rnd.kind.tolist(),
            g_sf=rnd.size_factor.tolist(),
            g_gb=rnd.model_gb.tolist(),
            g_warm_only=(rnd.g_model < 0).tolist(),
            g_in_bytes=rnd.in_bytes.tolist(),
            g_ref_ops=rnd.g_ref_ops[0].tolist(),
            g_ref_cost=rnd.g_ref_cost[0].tolist(),
            g_ref_energy=rnd.g_ref_energy[0].tolist(),
            g_tp=(w.throughput * rnd.g_urgency[0]).tolist(),
            g_fair=(w.fairness * rnd.g_deficit[0]).tolist(),
            g_prio=rnd.g_priority[0].tolist(),
        )
        return rnd.floats

    def _rescore_worker(self, rnd: _Round, wi: int) -> None:
        if rnd.slots[wi] <= 0:
            rnd.scores[:, wi] = NEG
            rnd.vidx[:, wi] = len(rnd.v_warm)
            rnd.live[int(rnd.type_of[wi])] -= 1
            if rnd.best is not None:
                rnd.best.worker_dropped(wi)
            return
        t = int(rnd.type_of[wi])
        rnd.vidx[:, wi] = 2 * t + rnd.warm[wi]  # a model it loaded or evicted
        rows, _, _ = self._score(
            rnd,
            slice(2 * t, 2 * t + 2),
            slice(None),
            np.array(rnd.n_g),
            np.array(rnd.oldest),
            rnd.idle,
        )
        rnd.scores[:, wi] = np.where(rnd.warm[wi], rows[1], rows[0])
        if rnd.best is not None:
            rnd.best.worker_changed(wi)

    def _batch_size(self, f: Floats, t: int, gi: int, n_g: float, idle: int) -> int:
        """The batch a worker of type `t` runs of group `gi` now (the rule `_score`
        applies, on scalars; `efficient` as _floats has it: the same ceil)."""
        row = f.by_kind[t][f.g_kind[gi]]
        efficient, maxb = row[2], row[3]
        cap = f.t_cap[t]
        if cap is not None:
            maxb = min(maxb, cap[gi])
        spread = math.ceil(n_g / max(idle, 1))
        n = min(max(spread, efficient), max(maxb, 1))
        return int(max(min(n, n_g), 1))

    def _assign(self, rnd: _Round, fair: FairShare, now: float) -> list[Decision]:
        """Greedy: the best pair is assigned, the scores of its worker and its group are
        refreshed, until no free worker has a feasible group."""
        if rnd.best is not None:
            return self._assign_best(rnd, rnd.best, fair, now)
        decisions: list[Decision] = []
        G = len(rnd.groups)
        while True:
            # the first best pair in (worker, group) order
            wi, gi = divmod(int(np.argmax(rnd.scores.T)), G)
            best = float(rnd.scores[gi, wi])
            if best == NEG:
                break
            f = self._floats(rnd)
            t = f.w_type[wi]
            n_g, idle = rnd.n_g[gi], int(rnd.idle[gi])
            n = self._batch_size(f, t, gi, n_g, idle)
            variant = 2 * t + int(rnd.warm[wi, gi])
            terms_at = _TermsAt(self, rnd, variant, gi, n_g, rnd.oldest[gi], idle)
            group = rnd.groups[gi]
            off = rnd.taken[gi]
            chosen = tuple(group.items[off : off + n])
            rnd.taken[gi] = off + n
            if wi < rnd.n_free:  # else: held for a busy worker that frees soon
                decisions.append(self._commit(rnd, wi, gi, chosen, best, terms_at, fair, now))
            self._after_pick(rnd, wi, gi, now)
        _charge(rnd, fair, now)
        return decisions

    def _assign_best(
        self, rnd: _Round, best_of: BestPerGroup, fair: FairShare, now: float
    ) -> list[Decision]:
        """_assign with finite inputs: the pick read from BestPerGroup, the picked group
        rescored in plain floats (score_column). The steps of _after_pick and
        _rescore_worker are inlined, in their order, over local names: a call and the
        attribute reads per step were a tenth of a pick."""
        decisions: list[Decision] = []
        f = self._floats(rnd)
        cfg, w = self.config, self.config.weights
        weights = (w.cost, w.energy, w.locality, w.aging, cfg.aging_scale_s, cfg.linger_s)
        groups, taken, n_free, w_type = rnd.groups, rnd.taken, rnd.n_free, f.w_type
        n_g_of, oldest_of, idle_of, slots_of = rnd.n_g, rnd.oldest, rnd.idle, rnd.slots
        scores, vidx, warm, live, g_types = rnd.scores, rnd.vidx, rnd.warm, rnd.live, rnd.g_types
        no_slot = len(rnd.v_warm)  # the variant (NEG) a worker with no slot left reads
        n_variants = len(rnd.column_buf)
        while (pick := best_of.pick()) is not None:
            wi, gi, best = pick
            t = w_type[wi]
            n_g, idle = n_g_of[gi], int(idle_of[gi])
            n = self._batch_size(f, t, gi, n_g, idle)
            terms_at = _TermsAt(self, rnd, 2 * t + int(warm[wi, gi]), gi, n_g, oldest_of[gi], idle)
            items = groups[gi].items
            off = taken[gi]
            chosen = tuple(items[off : off + n])
            taken[gi] = off = off + n
            if wi < n_free:  # else: held for a busy worker that frees soon
                decisions.append(self._commit(rnd, wi, gi, chosen, best, terms_at, fair, now))
            # _after_pick
            slots = slots_of[wi] = slots_of[wi] - 1
            if slots <= 0 and rnd.ready_w[wi]:
                idle_of -= rnd.compat_n[t]  # one idle worker fewer for its groups
            left = len(items) - off
            n_g_of[gi] = float(left)
            if left:
                oldest_of[gi] = now - items[off].ready_at
            # _rescore_worker
            if slots <= 0:
                scores[:, wi] = NEG
                vidx[:, wi] = no_slot
                live[t] -= 1
                best_of.worker_dropped(wi)
            else:
                self._rescore_worker(rnd, wi)
            # the group, in plain floats
            if not left:
                scores[gi] = NEG
            else:
                types = g_types.get(gi)
                if types is None:
                    types = g_types[gi] = rnd.compat[:, gi].nonzero()[0].tolist()
                vs, got = score_column(
                    f, gi, types, live, float(left), oldest_of[gi], int(idle_of[gi]), *weights
                )
                col = [NEG] * n_variants  # per variant; the last two: no slot left
                for v, score in zip(vs, got, strict=True):
                    col[v] = score
                np.array(col).take(vidx[gi], out=scores[gi])
            best_of.group_changed(gi)
        _charge(rnd, fair, now)
        return decisions

    def _commit(
        self,
        rnd: _Round,
        wi: int,
        gi: int,
        chosen: tuple[ReadyItem, ...],
        best: float,
        terms_at: Mapping[str, float],
        fair: FairShare,
        now: float,
    ) -> Decision:
        """The decision for a pick: model load and evictions on the worker, the batch's
        estimate, the tenants charged."""
        worker = rnd.rows_w[wi]
        n = len(chosen)
        f = self._floats(rnd)
        t = f.w_type[wi]
        c, k = f.t_class[t], f.g_kind[gi]
        gb = f.g_gb[gi]
        model = chosen[0].model
        load = model if model and model not in worker.resident else None
        evict: list[str] = []
        if load is not None:
            evict = self._make_room(worker, gb)
            for m in evict:
                worker.resident.pop(m, None)
                j = rnd.m_idx.get(m)
                if j is not None:
                    rnd.resident[wi, j] = False
            worker.resident[load] = gb
            rnd.resident[wi, rnd.m_idx[load]] = True
            rnd.warm[wi] = rnd.resident[wi, rnd.g_model]
        elif model:
            worker.resident[model] = worker.resident.pop(model)  # most recently used
        total_s, cost_usd, energy_j = batch_totals(
            n,
            f.fixed[c][k],
            f.per[c][k],
            max(f.g_sf[gi], f.c_min_sf[c]),
            load is None,
            gb,
            f.c_load[c],
            f.g_in_bytes[gi] * n,
            f.c_net[c],
            f.c_price[c],
            f.c_watts[c],
            f.t_startup[t],
            f.c_watts_idle[c],
        )
        # charged to the fair share at the end of the round: its deficits were read at
        # the start
        rnd.charges.append((gi, rnd.taken[gi] - n, n, total_s / n, cost_usd / n))
        worker.free_slots -= 1
        return Decision(
            worker=worker.id,
            device_class=worker.device_class,
            items=chosen,
            score=best,
            terms=terms_at,
            seconds=total_s,
            cost_usd=cost_usd,
            energy_j=energy_j,
            load_model=load,
            evict=tuple(evict),
        )

    def _after_pick(self, rnd: _Round, wi: int, gi: int, now: float) -> None:
        """A worker slot and part of a group are taken: refresh their scores."""
        slots = rnd.slots[wi] = rnd.slots[wi] - 1
        if slots <= 0 and rnd.ready_w[wi]:
            rnd.idle -= rnd.compat_n[self._floats(rnd).w_type[wi]]  # one idle worker fewer
        group = rnd.groups[gi]
        taken = rnd.taken[gi]
        left = len(group.items) - taken
        rnd.n_g[gi] = float(left)
        if left:
            rnd.oldest[gi] = now - group.items[taken].ready_at
        self._rescore_worker(rnd, wi)
        self._rescore_group(rnd, gi)

    def _make_room(self, worker: WorkerState, need_gb: float) -> list[str]:
        """Least-recently-used resident models to drop so `need_gb` fits."""
        capacity = self.fleet.classes[worker.device_class].memory_gb
        used = sum(worker.resident.values())
        evict = []
        for m, gb in list(worker.resident.items()):
            if used + need_gb <= capacity:
                break
            evict.append(m)
            used -= gb
        return evict


@dataclass
class _Round:
    """One round's tables (see Policy._round_tables); scores, slots, sizes and residency
    change as pairs are assigned."""

    groups: list[ReadyGroup]
    taken: list[int]  # per group: its first operators assigned so far this round
    rows_w: list[WorkerState]  # free workers, then busy ones that free soon
    n_free: int
    fixed_t: np.ndarray  # (class, kind) latency tables
    per_t: np.ndarray
    maxb_t: np.ndarray
    refs: _Refs  # per kind: ops/s, $/op, J/op
    kind: np.ndarray  # per group
    model_gb: np.ndarray
    size_factor: np.ndarray
    in_bytes: np.ndarray  # mean per operator
    # per group, as lists (read and written one at a time each pick)
    n_g: list[float]  # operators left
    oldest: list[float]  # seconds its oldest operator has waited
    deficit: np.ndarray
    priority: np.ndarray
    g_model: np.ndarray  # index into m_idx, -1: no model
    m_idx: dict[str, int]
    type_of: np.ndarray  # per worker: its type
    t_ci: np.ndarray  # per type: class index
    t_startup: np.ndarray
    t_wait: np.ndarray
    compat: np.ndarray  # (type, group): can run it
    compat_n: np.ndarray  # the same as 0/1 (idle's dtype: subtracted without a cast)
    cap: np.ndarray  # (type, group): largest batch the worker takes
    backlog: np.ndarray  # per type: seconds of work it could run, per idle worker
    ready_w: np.ndarray  # per worker: free now, not cold
    idle: np.ndarray  # per group: ready workers with a slot that can run it
    resident: np.ndarray  # (worker, model + none)
    warm: np.ndarray  # (worker, group): the group's model is resident
    slots: list[int]
    scores: np.ndarray  # (group, worker)
    # per decision: its group, first operator, operators, device-seconds and $ each
    charges: list[tuple[int, int, int, float, float]]
    tenant_idx: dict[str, int]  # the groups' tenants, numbered (columns for _charge)
    # (group, worker): the variant the worker's score is read from (2 x its type, + 1
    # with the group's model resident), or 2 x types (+ 1) when it has no slot left
    vidx: np.ndarray
    live: list[int]  # per type: workers with a slot left
    floats: Floats | None  # the tables as floats, from the first rescore
    g_types: dict[int, list[int]]  # per group rescored: the worker types that can run it
    column_buf: np.ndarray  # a rescored group's scores per variant
    best: BestPerGroup | None  # None: inputs that are not all finite (numpy's path)
    # per worker variant (V, 1), per group (1, G), per pair (V, G): see _round_tables
    v_warm: np.ndarray
    v_startup: np.ndarray
    v_wait: np.ndarray
    v_backlog: np.ndarray
    v_load_gbps: np.ndarray
    v_net_gbps: np.ndarray
    v_price: np.ndarray
    v_watts: np.ndarray
    v_watts_idle: np.ndarray
    g_model_gb: np.ndarray
    g_in_bytes: np.ndarray
    g_ref_ops: np.ndarray
    g_ref_cost: np.ndarray
    g_ref_energy: np.ndarray
    g_deficit: np.ndarray
    g_urgency: np.ndarray
    g_priority: np.ndarray
    vg_fixed: np.ndarray
    vg_per: np.ndarray
    vg_maxb: np.ndarray
    vg_efficient: np.ndarray
    vg_sfm: np.ndarray
    vg_compat: np.ndarray


def _charge(rnd: _Round, fair: FairShare, now: float) -> None:
    """Charge each tenant for its operators in the round's decisions: per tenant, in
    decision order, the sum of (device-seconds, $) per operator x its operators in
    each decision (float sums in that order, as a loop over each decision's tenants
    adds them), tenants in the order they first appear. From the groups' tenant names
    and arrays: a loop over every decision's tenants cost as much as the rest of a
    pick, and reading every assigned operator again about as much."""
    if not rnd.charges:
        return
    names: list[str] = []
    for gi, off, n, _, _ in rnd.charges:
        group = rnd.groups[gi]
        if len(group.tenant_of) == len(group.items):
            names += group.tenant_of[off : off + n]
        else:
            names += map(_tenant, group.items[off : off + n])
    # columns: the round's tenants (known: no pass over the names to find them), or,
    # with more of them than names, or a group whose `tenants` misses some, the names'
    tix = rnd.tenant_idx
    try:
        if len(tix) > len(names):
            raise KeyError
        code = np.fromiter(map(tix.__getitem__, names), np.int64, len(names))
    except KeyError:
        tix = {t: i for i, t in enumerate(dict.fromkeys(names))}
        code = np.fromiter(map(tix.__getitem__, names), np.int64, len(names))
    sizes = [n for _, _, n, _, _ in rnd.charges]
    D, T = len(rnd.charges), len(tix)
    first = np.repeat(np.arange(D) * T, sizes)
    counts = np.bincount(first + code, minlength=D * T).reshape(D, T)
    per_op = np.array([(device_s, cost_usd) for _, _, _, device_s, cost_usd in rnd.charges])
    taken = counts > 0
    # a tenant with no operator in a decision adds nothing (0.0 would not change a sum)
    device_s = np.add.accumulate(np.where(taken, per_op[:, :1] * counts, 0.0), axis=0)[-1]
    cost_usd = np.add.accumulate(np.where(taken, per_op[:, 1:] * counts, 0.0), axis=0)[-1]
    # the order they first appear: by the first decision with them, then by their first
    # operator in it (only those decisions are read again)
    cols = np.flatnonzero(taken.any(axis=0))
    new_in: dict[int, set[int]] = {}
    for t, d in zip(cols.tolist(), taken[:, cols].argmax(axis=0).tolist(), strict=True):
        new_in.setdefault(d, set()).add(t)
    starts = np.cumsum(sizes).tolist()
    tenant = list(tix)
    for d in sorted(new_in):
        new = new_in[d]
        for t in dict.fromkeys(code[starts[d] - sizes[d] : starts[d]].tolist()):
            if t in new:
                fair.charge(tenant[t], float(device_s[t]), float(cost_usd[t]), now)


def _finite_inputs(rnd: _Round) -> bool:
    """Whether score_column can stand for _score this round: finite tables and
    positive references (its divisions do not meet a zero, nothing is NaN)."""
    refs = np.concatenate([rnd.g_ref_ops[0], rnd.g_ref_cost[0], rnd.g_ref_energy[0]])
    if not (refs > 0).all():
        return False
    tables = (
        rnd.vg_fixed,
        rnd.vg_per,
        rnd.vg_sfm,
        rnd.vg_efficient,
        rnd.vg_maxb,
        rnd.v_backlog,
        rnd.v_startup,
        rnd.v_wait,
        rnd.g_model_gb,
        rnd.g_in_bytes,
        rnd.g_deficit,
        rnd.g_urgency,
        rnd.g_priority,
        np.array(rnd.oldest),
        refs,
    )
    # one check over all of them (a call per table cost more than the check)
    return bool(np.isfinite(np.concatenate([a.ravel() for a in tables])).all())


class _TermsAt(Mapping[str, float]):
    """A decision's utility terms, computed when first read (logs read them; the
    simulator never does), from the state of the round when the pair was picked."""

    def __init__(
        self,
        policy: Policy,
        rnd: _Round,
        variant: int,
        gi: int,
        n_g: float,
        oldest: float,
        idle: int,
    ) -> None:
        self._args = (policy, rnd, variant, gi, n_g, oldest, idle)
        self._terms: dict[str, float] | None = None

    def _get(self) -> dict[str, float]:
        if self._terms is None:
            policy, rnd, variant, gi, n_g, oldest, idle = self._args
            _, parts, _ = policy._score(
                rnd,
                slice(variant, variant + 1),
                slice(gi, gi + 1),
                np.array([n_g]),
                np.array([oldest]),
                np.array([idle]),
            )
            self._terms = {t: float(np.asarray(parts[t]).reshape(-1)[0]) for t in TERMS}
            self._args = None  # type: ignore[assignment]
        return self._terms

    def __getitem__(self, key: str) -> float:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(TERMS)
