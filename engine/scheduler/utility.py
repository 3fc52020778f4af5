"""The utility function U(batch, worker): one number that trades throughput, $ cost,
energy, locality and fairness, with configurable weights.

Written over numpy arrays so the policy scores every (worker, batch) pair of a round in
one pass; called with plain floats it scores one pair (tests, logs). Pure: no I/O.

    U = w_tp   * log(ops_per_s / ref_ops_per_s)         faster is better, sub-linearly
      - w_cost * (cost_per_op / ref_cost_per_op)        $ per operator on this class
      - w_en   * (energy_per_op / ref_energy_per_op)    joules per operator
      - w_loc  * (load_s + fetch_s) / total_s           time lost to moving weights/data
      + w_fair * deficit                                tenant got less than its share
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
    fairness: float = 0.5
    aging: float = 1.0


@dataclass(frozen=True)
class Estimate:
    exec_s: Any
    load_s: Any
    fetch_s: Any
    total_s: Any
    cost_usd: Any
    energy_j: Any


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
) -> Estimate:
    """Time, $ and energy of running a batch of n on a device (arrays broadcast)."""
    exec_s = (fixed_s + per_item_s * n) * size_factor
    load_s = np.where(warm, 0.0, model_gb / np.maximum(load_gbps, 1e-9))
    fetch_s = input_bytes / np.maximum(net_gbps * 1.25e8, 1.0)
    total_s = exec_s + load_s + fetch_s
    return Estimate(
        exec_s=exec_s,
        load_s=load_s,
        fetch_s=fetch_s,
        total_s=total_s,
        cost_usd=total_s * price_per_hour / 3600.0,
        energy_j=total_s * watts_busy,
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
) -> dict[str, Any]:
    total = np.maximum(est.total_s, 1e-9)
    n = np.maximum(n, 1)
    ops_per_s = n / total
    return {
        "throughput": weights.throughput * np.log(np.maximum(ops_per_s, 1e-12) / ref_ops_per_s),
        "cost": -weights.cost * (est.cost_usd / n) / ref_cost_per_op,
        "energy": -weights.energy * (est.energy_j / n) / ref_energy_per_op,
        "locality": -weights.locality * (est.load_s + est.fetch_s) / total,
        "fairness": weights.fairness * deficit,
        "aging": weights.aging * oldest_wait_s / aging_scale_s,
        "priority": priority,
    }


def utility(parts: dict[str, Any]) -> Any:
    return sum(parts[t] for t in TERMS)
