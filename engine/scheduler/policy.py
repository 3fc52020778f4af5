"""The scheduling policy: from a snapshot of ready operators and workers, the batches to
run and where, chosen by the utility function. Pure over its inputs (time is an
argument), so the live scheduler and the simulator make exactly the same decisions.

One round: ready operators are grouped by batch key (same executor build, params and
model, from any workflow); every (worker, group) pair is scored at the batch size the
worker's class takes (limited by its profile and the group's size); the best pair is
assigned; the scores of that worker and that group are refreshed; repeat until no free
worker has a feasible group. A worker may hold several models (memory-aware: loading
one evicts least-recently-used ones until it fits; a model larger than the device never
goes there), and warm workers win through the locality term.

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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flowmesh.engine.scheduler.fairness import FairShare, TenantPolicy
from flowmesh.engine.scheduler.fleet import Fleet, LatencyEstimator
from flowmesh.engine.scheduler.utility import TERMS, Weights, estimate, terms, utility

NEG = -math.inf


@dataclass(frozen=True)
class ReadyItem:
    """What the policy sees of one ready operator."""

    key: str
    batch_key: str
    kind: str
    executor: str  # "executor@version": only workers that advertise it may run it
    model: str | None
    model_gb: float
    input_bytes: int
    tenant: str
    workflow_id: str
    ready_at: float


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
    hold_s, release, scale_up, tenants: {name: {weight, priority, budget_usd}}."""
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

    def size_factor(self, kind: str, model_gb: float, device_class: str) -> float:
        """How a model's size scales a batch's time on a class, relative to the profile
        (the same factor decide() applies): observed times are divided by it before the
        estimator learns from them, so they are not scaled twice."""
        ref = {**self.fleet.ref_model_gb, **self.config.ref_model_gb}.get(kind, 0.0)
        raw = model_gb / ref if model_gb > 0 and ref > 0 else 1.0
        return max(raw, self.fleet.classes[device_class].min_size_factor)

    # --- per round tables -----------------------------------------------------------

    def _latency_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shape = (len(self.classes), max(1, len(self.kinds)))
        fixed, per, maxb = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        for ci, c in enumerate(self.classes):
            for ki, k in enumerate(self.kinds):
                m = self.estimator.model(c, k)
                if m is not None:
                    fixed[ci, ki], per[ci, ki], maxb[ci, ki] = m.fixed_s, m.per_item_s, m.max_batch
        return fixed, per, maxb

    def _references(
        self, fixed: np.ndarray, per: np.ndarray, maxb: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per kind, the geometric mean over the classes that run it (full batch, warm):
        what a 'typical' device does, so terms of different kinds are comparable."""
        k = fixed.shape[1]
        ops, cost, energy = np.ones(k), np.ones(k), np.ones(k)
        for ki in range(k):
            can = maxb[:, ki] > 0
            if not can.any():
                continue
            n = maxb[can, ki]
            secs = fixed[can, ki] + per[can, ki] * n
            ops[ki] = math.exp(float(np.mean(np.log(n / secs))))
            cost[ki] = math.exp(float(np.mean(np.log(secs * self.price[can] / 3600 / n))))
            energy[ki] = math.exp(float(np.mean(np.log(secs * self.watts[can] / n))))
        return ops, cost, energy

    # --- the round ------------------------------------------------------------------

    def decide(
        self,
        items: Sequence[ReadyItem],
        workers: Sequence[WorkerState],
        now: float,
        fair: FairShare | None = None,
    ) -> list[Decision]:
        fair = fair or FairShare(self.config.tenants)
        cfg = self.config
        free = [w for w in workers if w.free_slots > 0 and w.device_class in self._class_idx]
        # busy workers that free soon: scored as if free then; what they win is held
        soon = [
            w
            for w in workers
            if cfg.hold_s > 0
            and w.free_slots <= 0
            and w.busy_until is not None
            and 0 <= w.busy_until - now <= cfg.hold_s  # overdue: no telling when
            and w.device_class in self._class_idx
        ]
        eligible = [i for i in items if not fair.over_budget(i.tenant) and i.kind in self._kind_idx]
        if not free or not eligible:
            return []
        groups: dict[str, list[ReadyItem]] = {}
        for it in sorted(eligible, key=lambda i: i.ready_at):
            groups.setdefault(it.batch_key, []).append(it)
        glist = list(groups.values())
        deficits = fair.deficits((i.tenant for i in eligible), now)
        fixed_t, per_t, maxb_t = self._latency_tables()
        ref_ops, ref_cost, ref_energy = self._references(fixed_t, per_t, maxb_t)

        n_free = len(free)
        rows_w = free + soon
        G, W = len(glist), len(rows_w)
        kind = np.array([self._kind_idx[g[0].kind] for g in glist])
        model_gb = np.array([g[0].model_gb if g[0].model else 0.0 for g in glist])
        ref_model_gb = {**self.fleet.ref_model_gb, **cfg.ref_model_gb}
        ref_gb = np.array([ref_model_gb.get(g[0].kind, 0.0) for g in glist])
        size_factor = np.where(
            (model_gb > 0) & (ref_gb > 0), model_gb / np.maximum(ref_gb, 1e-9), 1.0
        )
        in_bytes = np.array([float(np.mean([i.input_bytes for i in g])) for g in glist])
        priority = np.array([max(fair.policy(i.tenant).priority for i in g) for g in glist])
        n_g = np.array([len(g) for g in glist], dtype=float)
        oldest = np.array([now - g[0].ready_at for g in glist])
        deficit = np.array([float(np.mean([deficits[i.tenant] for i in g])) for g in glist])
        ci = np.array([self._class_idx[w.device_class] for w in rows_w])
        slots = np.array([w.free_slots if i < n_free else 1 for i, w in enumerate(rows_w)])
        startup = np.array(
            [max(0.0, w.startup_s) if i < n_free else 0.0 for i, w in enumerate(rows_w)]
        )
        wait = np.array(
            [
                0.0 if i < n_free else max(0.0, (w.busy_until or now) - now)
                for i, w in enumerate(rows_w)
            ]
        )
        # idle capacity a backlog is spread over: free now (not cold, not busy)
        ready = (startup <= 0) & (np.arange(W) < n_free)
        models = sorted({g[0].model for g in glist if g[0].model})
        m_idx = {m: j for j, m in enumerate(models)}
        g_model = np.array([m_idx.get(g[0].model or "", -1) for g in glist])

        # compatibility that does not change within the round
        compat = maxb_t[ci][:, kind] > 0
        compat &= model_gb[None, :] <= self.memory[ci][:, None]
        for wi, w in enumerate(rows_w):
            if w.executors is not None:
                compat[wi] &= np.array([g[0].executor in w.executors for g in glist])
            if w.models is not None:
                compat[wi] &= np.array(
                    [g[0].model is None or g[0].model in w.models for g in glist]
                )
        cap = np.full((W, G), np.inf)
        for wi, w in enumerate(rows_w):
            if w.batch_caps:
                caps = w.batch_caps
                cap[wi] = [caps.get(g[0].executor, np.inf) for g in glist]
        # the work a new worker is expected to do once up: its share of all the backlog
        # it could run (with the idle workers), in seconds on its class at full batches
        kk = kind[None, :]
        full = np.maximum(maxb_t[ci[:, None], kk], 1)
        work = (
            np.ceil(n_g[None, :] / full) * fixed_t[ci[:, None], kk]
            + n_g[None, :] * per_t[ci[:, None], kk]
        ) * np.maximum(size_factor[None, :], self.min_sf[ci][:, None])
        n_idle = int(((startup <= 0) & (np.arange(W) < n_free)).sum())
        backlog_s = np.where(compat, work, 0.0).sum(axis=1) / (n_idle + 1)
        resident = np.zeros((W, len(models) + 1), dtype=bool)
        resident[:, -1] = True  # "no model" is always warm
        for wi, w in enumerate(rows_w):
            for m in w.resident:
                if m in m_idx:
                    resident[wi, m_idx[m]] = True

        def block(
            rows: np.ndarray, cols: np.ndarray
        ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
            c = ci[rows][:, None]
            k = kind[cols][None, :]
            maxb = np.minimum(maxb_t[c, k], cap[np.ix_(rows, cols)])
            # spread a backlog over the idle workers that could take it (latency), but
            # never into batches so small that fixed overhead dominates (cost); cold
            # workers (they may never be allocated) and busy ones are not idle capacity
            able = compat[:, cols] & (slots[:, None] > 0)
            idle = (able & ready[:, None]).sum(axis=0)[None, :]
            spread = np.ceil(n_g[cols][None, :] / np.maximum(idle, 1))
            e = cfg.spread_efficiency
            efficient = np.ceil(
                e * fixed_t[c, k] / ((1 - e) * np.maximum(per_t[c, k], 1e-12)) - 1e-9
            )
            n = np.minimum(np.maximum(spread, efficient), np.maximum(maxb, 1))
            n = np.maximum(np.minimum(n, n_g[cols][None, :]), 1)
            warm = resident[rows][:, g_model[cols]]
            # the batches of this group the worker is expected to run: its share of the
            # backlog (a cold one joins the idle ones), over which one-off costs spread
            share = n_g[cols][None, :] / np.maximum(idle + (startup[rows] > 0)[:, None], 1)
            runs = np.maximum(share / n, 1.0)
            batch_s = (fixed_t[c, k] + per_t[c, k] * n) * np.maximum(
                size_factor[cols][None, :], self.min_sf[c]
            )
            startup_runs = np.maximum(backlog_s[rows][:, None] / np.maximum(batch_s, 1e-9), runs)
            est = estimate(
                n,
                fixed_t[c, k],
                per_t[c, k],
                np.maximum(size_factor[cols][None, :], self.min_sf[c]),
                warm,
                model_gb[cols][None, :],
                self.load_gbps[c],
                in_bytes[cols][None, :] * n,
                self.net_gbps[c],
                self.price[c],
                self.watts[c],
                startup_s=startup[rows][:, None],
                watts_idle=self.watts_idle[c],
                wait_s=wait[rows][:, None],
                runs=runs,
                startup_runs=startup_runs,
            )
            # references scale with the model: a small model's batch is compared with what
            # a typical device does for a model of that size, not for the reference one
            sf = size_factor[cols][None, :]
            parts = terms(
                n,
                est,
                ref_ops[k] / sf,
                ref_cost[k] * sf,
                ref_energy[k] * sf,
                deficit[cols][None, :],
                oldest[cols][None, :],
                priority[cols][None, :],
                cfg.weights,
                cfg.aging_scale_s,
            )
            score = utility(parts)
            ok = compat[np.ix_(rows, cols)] & (slots[rows][:, None] > 0) & (n_g[cols][None, :] > 0)
            # linger: a partial batch waits a little for company, unless it is old
            ok &= (n_g[cols][None, :] >= maxb) | (oldest[cols][None, :] >= cfg.linger_s)
            return np.where(ok, score, NEG), parts, n

        scores, _, _ = block(np.arange(W), np.arange(G))
        decisions: list[Decision] = []
        while True:
            flat = int(np.argmax(scores))
            wi, gi = divmod(flat, G)
            best = float(scores[wi, gi])
            if best == NEG:
                break
            _, parts, n_arr = block(np.array([wi]), np.array([gi]))
            n = int(n_arr[0, 0])
            worker = rows_w[wi]
            group = glist[gi]
            chosen, glist[gi] = tuple(group[:n]), group[n:]
            if wi >= n_free:  # held for a busy worker that frees soon: not assigned now
                self._after_pick(wi, gi, glist, slots, n_g, oldest, now, scores, block)
                continue
            c = int(ci[wi])
            k = int(kind[gi])
            model = chosen[0].model
            load = model if model and model not in worker.resident else None
            evict: list[str] = []
            if load is not None:
                evict = self._make_room(worker, float(model_gb[gi]))
                for m in evict:
                    worker.resident.pop(m, None)
                    if m in m_idx:
                        resident[wi, m_idx[m]] = False
                worker.resident[load] = float(model_gb[gi])
                resident[wi, m_idx[load]] = True
            elif model:
                worker.resident[model] = worker.resident.pop(model)  # most recently used
            est = estimate(
                n,
                fixed_t[c, k],
                per_t[c, k],
                max(float(size_factor[gi]), float(self.min_sf[c])),
                load is None,
                model_gb[gi],
                self.load_gbps[c],
                in_bytes[gi] * n,
                self.net_gbps[c],
                self.price[c],
                self.watts[c],
                startup_s=float(startup[wi]),
                watts_idle=float(self.watts_idle[c]),
            )
            decisions.append(
                Decision(
                    worker=worker.id,
                    device_class=worker.device_class,
                    items=chosen,
                    score=best,
                    terms={t: float(np.asarray(parts[t]).reshape(-1)[0]) for t in TERMS},
                    seconds=float(est.total_s),
                    cost_usd=float(est.cost_usd),
                    energy_j=float(est.energy_j),
                    load_model=load,
                    evict=tuple(evict),
                )
            )
            for it in chosen:
                fair.charge(it.tenant, float(est.total_s) / n, float(est.cost_usd) / n, now)
            worker.free_slots -= 1
            self._after_pick(wi, gi, glist, slots, n_g, oldest, now, scores, block)
        return decisions

    @staticmethod
    def _after_pick(
        wi: int,
        gi: int,
        glist: list[list[ReadyItem]],
        slots: np.ndarray,
        n_g: np.ndarray,
        oldest: np.ndarray,
        now: float,
        scores: np.ndarray,
        block: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, Any, np.ndarray]],
    ) -> None:
        """A worker slot and part of a group are taken: refresh their scores."""
        slots[wi] -= 1
        n_g[gi] = len(glist[gi])
        if glist[gi]:
            oldest[gi] = now - glist[gi][0].ready_at
        row, _, _ = block(np.array([wi]), np.arange(scores.shape[1]))
        scores[wi, :] = row[0]
        col, _, _ = block(np.arange(scores.shape[0]), np.array([gi]))
        scores[:, gi] = col[:, 0]

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
