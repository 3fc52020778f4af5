"""The utility function U(batch, worker): one number that trades throughput, $ cost,
energy, locality and fairness, with configurable weights.

Written over numpy arrays so the policy scores every (worker, batch) pair of a round in
one pass; called with plain floats it scores one pair (tests, logs). Pure: no I/O.

    U = w_tp   * log(ops_per_s / ref_ops_per_s)         faster is better, sub-linearly
      - w_cost * (cost_per_op / ref_cost_per_op)        $ per operator on this class
      - w_en   * (energy_per_op / ref_energy_per_op)    joules per operator
      - w_loc  * (load_s + fetch_s + start_s) / time    time lost to moving weights/data
                                                        or to a cold start / a wait
      + w_fair * log(due / got)                         tenant got less than its weighted
                                                        share (fairness.py: bounded)
      + w_age  * oldest_wait_s / aging_scale_s          unbounded: nothing starves
      + priority                                        the tenant's priority
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TERMS = ("throughput", "cost", "energy", "locality", "fairness", "aging", "priority")


@dataclass(frozen=True)
class Weights:
    throughput: float = 1.0
    cost: float = 1.0
    energy: float = 0.3
    locality: float = 0.5
    fairness: float = 1.0
    aging: float = 1.0


@dataclass(frozen=True)
class Estimate:
    exec_s: Any
    load_s: Any
    fetch_s: Any
    total_s: Any  # on the device: exec + load + fetch
    cost_usd: Any
    energy_j: Any
    start_s: Any = 0.0  # before it can start: cold start (billed) + wait for a busy worker


def estimate(
    n: Any,
    fixed_s: Any,
    per_item_s: Any,
    size_factor: Any,
    warm: Any,
    model_gb: Any,
    load_gbps: Any,
    input_bytes: Any,
    net_gbps: Any,
    price_per_hour: Any,
    watts_busy: Any,
    startup_s: Any = 0.0,
    watts_idle: Any = 0.0,
    wait_s: Any = 0.0,
    runs: Any = 1.0,
    startup_runs: Any = None,
) -> Estimate:
    """Time, $ and energy of running a batch of n on a device (arrays broadcast).

    `startup_s`: the worker's cold start / allocation before it can run anything, billed
    at its price and drawing `watts_idle`; `wait_s`: until a busy worker frees (not
    billed to this batch: it is paid for by the one it runs). One-off costs are shared
    by the batches that pay them off: the model load by the `runs` batches the worker
    is expected to run with that model, the startup by `startup_runs` (default `runs`),
    the batches' worth of work it is expected to do once up (1: all on this batch)."""
    runs = np.maximum(runs, 1.0)
    exec_s = (fixed_s + per_item_s * n) * size_factor
    load_s = np.where(warm, 0.0, model_gb / np.maximum(load_gbps, 1e-9)) / runs
    fetch_s = input_bytes / np.maximum(net_gbps * 1.25e8, 1.0)
    startup = np.asarray(startup_s) / (
        runs if startup_runs is None else np.maximum(startup_runs, 1.0)
    )
    total_s = exec_s + load_s + fetch_s
    return Estimate(
        exec_s=exec_s,
        load_s=load_s,
        fetch_s=fetch_s,
        total_s=total_s,
        cost_usd=(total_s + startup) * price_per_hour / 3600.0,
        energy_j=total_s * watts_busy + startup * watts_idle,
        start_s=startup + wait_s,
    )


def batch_totals(
    n: int,
    fixed_s: float,
    per_item_s: float,
    size_factor: float,
    warm: bool,
    model_gb: float,
    load_gbps: float,
    input_bytes: float,
    net_gbps: float,
    price_per_hour: float,
    watts_busy: float,
    startup_s: float = 0.0,
    watts_idle: float = 0.0,
) -> tuple[float, float, float]:
    """`estimate` for one batch in plain floats (one-off costs all on it), as (total_s,
    cost_usd, energy_j): the same operations in the same order, so the same numbers,
    without numpy's per-call cost or an Estimate's (the policy makes one per decision)."""
    exec_s = (fixed_s + per_item_s * n) * size_factor
    load_s = 0.0 if warm else model_gb / max(load_gbps, 1e-9)
    fetch_s = input_bytes / max(net_gbps * 1.25e8, 1.0)
    startup = float(startup_s)
    total_s = exec_s + load_s + fetch_s
    return (
        total_s,
        (total_s + startup) * price_per_hour / 3600.0,
        total_s * watts_busy + startup * watts_idle,
    )


def terms(
    n: Any,
    est: Estimate,
    ref_ops_per_s: Any,
    ref_cost_per_op: Any,
    ref_energy_per_op: Any,
    deficit: Any,
    oldest_wait_s: Any,
    priority: Any,
    weights: Weights,
    aging_scale_s: float,
    urgency: Any = 1.0,
) -> dict[str, Any]:
    """The utility's terms. `urgency` scales the throughput term by how close the
    batch's deadline is (Policy: below 1 with slack, so cost decides; above 1 when
    little is left; 1 without a deadline)."""
    total = np.maximum(est.total_s + est.start_s, 1e-9)
    n = np.maximum(n, 1)
    ops_per_s = n / total
    return {
        "throughput": weights.throughput
        * urgency
        * np.log(np.maximum(ops_per_s, 1e-12) / ref_ops_per_s),
        "cost": -weights.cost * (est.cost_usd / n) / ref_cost_per_op,
        "energy": -weights.energy * (est.energy_j / n) / ref_energy_per_op,
        "locality": -weights.locality * (est.load_s + est.fetch_s + est.start_s) / total,
        "fairness": weights.fairness * deficit,
        "aging": weights.aging * oldest_wait_s / aging_scale_s,
        "priority": priority,
    }


def utility(parts: dict[str, Any]) -> Any:
    return sum(parts[t] for t in TERMS)
