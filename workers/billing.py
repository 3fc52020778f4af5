"""Fair bills: an operator is charged for the work it took, not for the state the
machine happened to be in when its batch ran.

Two things inflate a batch's wall time without being its tenant's work:
- warm-up: the first batch of an inference model on a worker pays the first call's
  allocations and kernel selection (seconds for a batch that takes 0.1 s warm). Before
  that batch the worker runs the executor once on its inputs, unbilled (its results
  dropped), and that time is fleet overhead;
- contention: on a CPU worker sharing its machine, time spent waiting for a core. The
  batch is billed its CPU time (the process's, so an executor's own threads count) when
  that is less than its wall time; the difference is fleet overhead. On a worker with a
  GPU the wall time is billed (the GPU is not shared, and a thread waiting on it spends
  no CPU).

What a batch measures after that still varies with the machine (caches, memory, other
processes: +-15-30% per batch on a loaded 2-core box), so an operator is billed at a
standard rate (`StandardRates`): per executor and model, seconds per operator, set by
the first batch this worker runs of it and moved by each later batch; a batch is billed
at the rate from before it. The difference between what a batch took and what it was
billed (warm-up and waiting included) is the fleet's overhead, recorded on each
operator's entry (OpState.overhead_seconds; negative when the batch ran under the
rate), and the cost report shows it beside the tenants' bills, so bills and overhead
still add up to what the fleet spent.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

# kinds whose executors are warmed up before their first batch: inference on a loaded
# model, where running one input once has no effect beyond its time
WARM_KINDS = frozenset({"generate", "embed", "score"})


def gpu_in_use() -> bool:
    """Whether this process computes on a GPU (torch imported and CUDA available)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def split(wall_s: float, cpu_s: float, warmup_s: float, by_cpu: bool) -> tuple[float, float]:
    """A batch's (billed, overhead) seconds: `wall_s` it ran, `cpu_s` the process spent
    meanwhile, `warmup_s` its warm-up took before it."""
    wall_s = max(0.0, wall_s)
    billed = min(wall_s, cpu_s) if by_cpu and cpu_s > 0 else wall_s
    return billed, (wall_s - billed) + max(0.0, warmup_s)


@dataclass
class StandardRates:
    """Seconds per operator per (executor, model, adapter) on this worker: an operator
    is billed the rate as it stood before its batch (its batch's own figure for the
    first one), then the batch moves the rate by `alpha`."""

    alpha: float = 0.2
    rates: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def bill(self, key: tuple[str, str, str], n: int, measured_s: float) -> float:
        """Seconds to bill each of the batch's `n` operators, which took `measured_s`."""
        per_op = measured_s / max(n, 1)
        rate = self.rates.get(key)
        if rate is None:
            self.rates[key] = per_op
            return per_op
        self.rates[key] = (1 - self.alpha) * rate + self.alpha * per_op
        return rate
