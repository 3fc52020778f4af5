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

import math
from dataclasses import dataclass

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
    vs: list[int] = []
    args: list[float] = []
    rest: list[tuple[float, float, float]] = []
    ok_v: list[bool] = []
    for t in types:
        if not live[t]:
            continue
        c = f.t_class[t]
        fixed, per, efficient = f.fixed[c][k], f.per[c][k], f.efficient[c][k]
        maxb = f.maxb[c][k]
        cap = f.t_cap[t]
        if cap is not None and cap[gi] < maxb:
            maxb = cap[gi]
        min_sf = f.c_min_sf[c]
        sfm = sf if sf >= min_sf else min_sf
        startup_s, wait, backlog = f.t_startup[t], f.t_wait[t], f.t_backlog[t]
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
        fetch_s = in_bytes * n / f.c_fetch[c]
        startup = startup_s / (startup_runs if startup_runs > 1.0 else 1.0)
        start_s = startup + wait
        price, watts, watts_idle = f.c_price[c], f.c_watts[c], f.c_watts_idle[c]
        ok = old_enough or n_col >= maxb
        # without the group's model resident (variant 2t: its load is shared by the
        # runs), then with it (2t + 1)
        for v, load0 in (
            ((2 * t + 1, 0.0),) if warm_only else ((2 * t, gb / f.c_load[c]), (2 * t + 1, 0.0))
        ):
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
            )
            ok_v.append(ok)
    if not vs:
        return vs, []
    logs = np.log(np.array(args)).tolist()
    tp, fair, prio = f.g_tp[gi], f.g_fair[gi], f.g_prio[gi]
    out = [
        tp * lg + cost + energy + loc + fair + aging + prio if ok else NEG
        for lg, (cost, energy, loc), ok in zip(logs, rest, ok_v, strict=True)
    ]
    return vs, out


class BestPerGroup:
    """Per group (a row of `scores`, shape (group, worker)), its greatest score and the
    first worker with it, kept as rows and columns change: the round's pick is then the
    first (worker, group) pair in worker-major order with the greatest score, which is
    what np.argmax over the (worker, group) matrix returns, without reading it all.

    A group whose best worker lost its scores is only marked stale: its recorded best
    still bounds it from above, and it is looked at again when it could be the pick.
    Scores must not be NaN (np.argmax puts NaN first; these comparisons do not)."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores
        self.arg = scores.argmax(axis=1)
        self.best = scores[np.arange(scores.shape[0]), self.arg]
        self.stale = np.zeros(scores.shape[0], dtype=bool)

    def pick(self) -> tuple[int, int, float] | None:
        """(worker, group, score) of the best pair; None when every pair is NEG."""
        best, stale = self.best, self.stale
        while True:
            gi = int(best.argmax())
            top = float(best[gi])
            if top == NEG:
                return None
            if stale[gi]:
                # every stale group that may be above the best known exactly, at once
                known = np.where(stale, NEG, best).max()
                self._recompute((stale & (best >= known)).nonzero()[0])
                continue
            groups = (best == top).nonzero()[0]
            if len(groups) == 1:
                return int(self.arg[gi]), gi, top
            old = groups[stale[groups]]
            if len(old):
                self._recompute(old)
                continue
            workers = self.arg[groups]
            first = workers.min()
            return int(first), int(groups[int(np.argmax(workers == first))]), top

    def group_changed(self, gi: int) -> None:
        row = self.scores[gi]
        a = int(row.argmax())
        self.arg[gi] = a
        self.best[gi] = row[a]
        self.stale[gi] = False

    def worker_dropped(self, wi: int) -> None:
        """The worker's scores all became NEG: the groups it was best for go stale."""
        self.stale |= (self.arg == wi) & (self.best > NEG)

    def worker_changed(self, wi: int) -> None:
        """The worker's scores were refreshed (it has a slot left)."""
        col, best, arg, stale = self.scores[:, wi], self.best, self.arg, self.stale
        # it was best and scores less now: stale (its old best still bounds the group)
        stale |= (arg == wi) & (col < best)
        # above the best (or its bound): it is the best; equal to a best that is known
        # exactly: the first of the two
        up = col > best
        first = (col == best) & (wi < arg) & ~stale
        best[up] = col[up]
        arg[up | first] = wi
        stale[up] = False

    def _recompute(self, groups: np.ndarray) -> None:
        sub = self.scores[groups]
        self.arg[groups] = sub.argmax(axis=1)
        self.best[groups] = sub.max(axis=1)
        self.stale[groups] = False
