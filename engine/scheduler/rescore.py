"""The two steps a policy round repeats after every pick, made cheap: one group's scores
over the worker variants, in plain floats, and the round's best pair, kept per group
instead of found by an argmax over every (worker, group) pair.

`score_column` is `Policy._score` for one group written as scalar Python: the same
operations in the same order on the same float64 values, so the same numbers, except
the logarithm, which stays numpy's (numpy's SIMD log and libm's differ in the last bit
for some inputs). A pick refreshes one group; over its few worker variants numpy's
per-call cost was most of the round (about 60 array calls per refresh).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

NEG = -math.inf


@dataclass
class Floats:
    """A round's tables as plain floats (lists), for score_column: numpy's reads of
    single elements cost more than the arithmetic done with them."""

    w_type: list[int]  # per worker
    # per worker type
    t_class: list[int]
    t_startup: list[float]
    t_wait: list[float]
    t_backlog: list[float]
    t_cap: list[list[float] | None]  # per group: largest batch it takes (None: no caps)
    # per class
    c_load: list[float]  # GB/s loading a model, at least 1e-9
    c_fetch: list[float]  # bytes/s in, at least 1
    c_net: list[float]  # Gb/s
    c_price: list[float]
    c_watts: list[float]
    c_watts_idle: list[float]
    c_min_sf: list[float]
    # per (class, kind)
    fixed: list[list[float]]
    per: list[list[float]]
    maxb: list[list[float]]
    efficient: list[list[float]]  # smallest batch worth splitting a backlog into
    # per group
    g_kind: list[int]
    g_sf: list[float]  # model size factor
    g_gb: list[float]  # model GB (0: none)
    g_warm_only: list[bool]  # no model: warm on every worker
    g_in_bytes: list[float]  # mean per operator
    g_ref_ops: list[float]
    g_ref_cost: list[float]
    g_ref_energy: list[float]
    g_tp: list[float]  # throughput weight x urgency
    g_fair: list[float]  # the fairness term
    g_prio: list[float]
    # per worker type, per kind: what score_column reads of the type and its class
    # (fixed, per, efficient, maxb, min_sf, startup_s, wait, backlog, c_fetch, c_load,
    # price, watts, watts_idle): one read instead of thirteen
    by_kind: list[list[tuple[float, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.by_kind:
            self.by_kind = [
                [
                    (
                        self.fixed[c][k],
                        self.per[c][k],
                        self.efficient[c][k],
                        self.maxb[c][k],
                        self.c_min_sf[c],
                        self.t_startup[t],
                        self.t_wait[t],
                        self.t_backlog[t],
                        self.c_fetch[c],
                        self.c_load[c],
                        self.c_price[c],
                        self.c_watts[c],
                        self.c_watts_idle[c],
                    )
                    for k in range(len(self.fixed[c]))
                ]
                for t, c in enumerate(self.t_class)
            ]


def score_column(
    f: Floats,
    gi: int,
    types: list[int],
    live: list[int],
    n_col: float,
    oldest: float,
    idle: int,
    w_cost: float,
    w_energy: float,
    w_locality: float,
    w_aging: float,
    aging_scale_s: float,
    linger_s: float,
) -> tuple[list[int], list[float]]:
    """Group `gi`'s scores per worker variant (2 x type, + 1 with the group's model
    resident) of `types` with a free worker (`live[t] > 0`), the group having `n_col`
    operators, the oldest waiting `oldest` s, `idle` idle workers able to run it.
    Infeasible pairs score NEG. Policy._score, utility.estimate and utility.terms say
    what each line is; the order of operations is theirs."""
    spread = float(math.ceil(n_col / (idle if idle > 1 else 1)))
    share = (n_col / (idle if idle > 1 else 1), n_col / (idle + 1 if idle + 1 > 1 else 1))
    aging = w_aging * oldest / aging_scale_s
    old_enough = oldest >= linger_s
    k, sf, gb = f.g_kind[gi], f.g_sf[gi], f.g_gb[gi]
    in_bytes, ref_ops, ref_cost, ref_energy = (
        f.g_in_bytes[gi],
        f.g_ref_ops[gi],
        f.g_ref_cost[gi],
        f.g_ref_energy[gi],
    )
    warm_only = f.g_warm_only[gi]
    by_kind, t_cap = f.by_kind, f.t_cap
    vs: list[int] = []
    args: list[float] = []
    # per variant: its cost, energy and locality terms, or None when infeasible
    rest: list[tuple[float, float, float] | None] = []
    for t in types:
        if not live[t]:
            continue
        (fixed, per, efficient, maxb, min_sf, startup_s, wait, backlog, fetch, load, price,
         watts, watts_idle) = by_kind[t][k]  # fmt: skip
        cap = t_cap[t]
        if cap is not None and cap[gi] < maxb:
            maxb = cap[gi]
        sfm = sf if sf >= min_sf else min_sf
        n = efficient if efficient > spread else spread
        maxb1 = maxb if maxb > 1.0 else 1.0
        if maxb1 < n:
            n = maxb1
        if n_col < n:
            n = n_col
        if n < 1.0:
            n = 1.0
        runs = share[startup_s > 0] / n
        if runs < 1.0:
            runs = 1.0
        exec_s = (fixed + per * n) * sfm
        startup_runs = backlog / (exec_s if exec_s > 1e-9 else 1e-9)
        if startup_runs < runs:
            startup_runs = runs
        fetch_s = in_bytes * n / fetch
        startup = startup_s / (startup_runs if startup_runs > 1.0 else 1.0)
        start_s = startup + wait
        ok = old_enough or n_col >= maxb
        # without the group's model resident (variant 2t: its load is shared by the
        # runs), then with it (2t + 1)
        variants = ((2 * t, gb / load), (2 * t + 1, 0.0)) if not warm_only else ((2 * t + 1, 0.0),)
        for v, load0 in variants:
            load_s = load0 / runs
            total_s = exec_s + load_s + fetch_s
            cost_usd = (total_s + startup) * price / 3600.0
            energy_j = total_s * watts + startup * watts_idle
            total = total_s + start_s
            if total < 1e-9:
                total = 1e-9
            ops = n / total
            vs.append(v)
            args.append((ops if ops > 1e-12 else 1e-12) / ref_ops)
            rest.append(
                (
                    -w_cost * (cost_usd / n) / ref_cost,
                    -w_energy * (energy_j / n) / ref_energy,
                    -w_locality * (load_s + fetch_s + start_s) / total,
                )
                if ok
                else None
            )
    if not vs:
        return vs, []
    logs = np.log(np.array(args)).tolist()
    tp, fair, prio = f.g_tp[gi], f.g_fair[gi], f.g_prio[gi]
    out = []
    for lg, terms in zip(logs, rest, strict=True):
        if terms is None:
            out.append(NEG)
        else:
            cost, energy, loc = terms
            out.append(tp * lg + cost + energy + loc + fair + aging + prio)
    return vs, out


class BestPerGroup:
    """Per group (a row of `scores`, shape (group, worker)), its greatest score and the
    first worker with it, kept as rows and columns change: the round's pick is then the
    first (worker, group) pair in worker-major order with the greatest score, which is
    what np.argmax over the (worker, group) matrix returns, without reading it all.

    The groups sit in a heap by (-score, worker, group): its top is the pick. A group
    whose best worker lost its score is only marked stale: its recorded key is still
    no greater than its true one (any other worker with that score comes later), so it
    is recomputed only when it reaches the top. A change is a new heap entry; the old
    one is dropped when it reaches the top. (numpy calls per pick were most of a
    round: an argmax, comparisons and masks over every group's best each time.)
    Scores must not be NaN (np.argmax puts NaN first; these comparisons do not)."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores
        arg = scores.argmax(axis=1)
        best = scores[np.arange(scores.shape[0]), arg]
        self.arg: list[int] = arg.tolist()
        self.stale = [False] * scores.shape[0]
        # per worker that is one: the groups whose recorded best worker it is
        self._of: dict[int, set[int]] = {}
        for gi, wi in enumerate(self.arg):
            self._best_for(wi).add(gi)
        # per group: its current heap entry (older ones are skipped)
        self._key = [
            (-b, wi, gi) for gi, (b, wi) in enumerate(zip(best.tolist(), self.arg, strict=True))
        ]
        self._heap = list(self._key)
        heapq.heapify(self._heap)

    def pick(self) -> tuple[int, int, float] | None:
        """(worker, group, score) of the best pair; None when every pair is NEG."""
        heap, key, stale = self._heap, self._key, self.stale
        while heap:
            top = heap[0]
            gi = top[2]
            if top is not key[gi]:
                heapq.heappop(heap)
            elif top[0] == -NEG:  # no group's score (or bound) is above NEG
                return None
            elif stale[gi]:  # recomputed: one at a time, only those that reach the top
                heapq.heappop(heap)
                row = self.scores[gi]
                wi = int(row.argmax())
                self._record(gi, wi, float(row[wi]))
            else:
                return top[1], gi, -top[0]
        return None

    def group_changed(self, gi: int) -> None:
        row = self.scores[gi]
        a = int(row.argmax())
        self._record(gi, a, float(row[a]))

    def worker_dropped(self, wi: int) -> None:
        """The worker's scores all became NEG: the groups it was best for go stale."""
        stale = self.stale
        for gi in self._of.get(wi, ()):
            stale[gi] = True

    def worker_changed(self, wi: int) -> None:
        """The worker's scores were refreshed (it has a slot left)."""
        arg, stale, key = self.arg, self.stale, self._key
        for gi, score in enumerate(self.scores[:, wi].tolist()):
            best, a = -key[gi][0], arg[gi]
            if score > best:  # above the best (or its bound): it is the best
                self._record(gi, wi, score)
            elif score == best:
                # equal to the best (or its bound): the first of the two; a stale
                # group's key stays no greater than its true one
                if wi < a:
                    self._record(gi, wi, score, stale[gi])
            elif a == wi:  # it was best and scores less now: its old best bounds it
                stale[gi] = True

    def _best_for(self, wi: int) -> set[int]:
        groups = self._of.get(wi)
        if groups is None:
            groups = self._of[wi] = set()
        return groups

    def _record(self, gi: int, wi: int, score: float, stale: bool = False) -> None:
        old = self.arg[gi]
        if old != wi:
            self._of[old].discard(gi)
            self._best_for(wi).add(gi)
            self.arg[gi] = wi
        self.stale[gi] = stale
        entry = self._key[gi] = (-score, wi, gi)
        heapq.heappush(self._heap, entry)
