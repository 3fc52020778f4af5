"""What one mode measured on a workload, in one shape for fabric, isolated and Ray."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# (mode, workflows finished, workflows in the run)
Progress = Callable[[str, int, int], None]


def no_progress(mode: str, done: int, total: int) -> None:
    return None


@dataclass
class WorkflowResult:
    workflow_id: str
    tenant: str
    at_s: float  # when the workload asked for it, seconds after the start
    state: str  # completed | failed | timeout
    latency_s: float | None  # submitted -> completed
    device_seconds: float = 0.0  # its share of the worker time (split when shared)
    usd: float = 0.0
    energy_j: float = 0.0
    error: str | None = None
    # sha256 of every node's result records (canonical JSON, in spec order): greedy
    # decoding gives the same bytes in every mode
    output_digest: str = ""


@dataclass
class ModeResult:
    mode: str
    workers: int  # worker processes (Ray: worker CPUs) that executed operators
    workflows: list[WorkflowResult]
    ops_requested: int  # operators the workflows asked for
    ops_executed: int  # operators that actually ran (committed results)
    worker_seconds: float  # busy time of the workers, summed (executor batches, warm-ups)
    usd: float
    energy_j: float
    makespan_s: float  # first submission -> last completion
    setup_s: float  # starting processes before the clock (not in any latency)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # CPU seconds the worker processes used from the first submission to the last
    # completion (kernel accounting; nan where it is not measured)
    worker_cpu_s: float = float("nan")
    # of worker_seconds, what no workflow was billed: warm-up, waiting for a core
    overhead_s: float = 0.0

    @property
    def completed(self) -> int:
        return sum(w.state == "completed" for w in self.workflows)

    def latencies(self) -> list[float]:
        return [w.latency_s for w in self.workflows if w.latency_s is not None]

    def latency(self, q: float) -> float:
        lat = self.latencies()
        return float(np.percentile(lat, q)) if lat else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "workers": self.workers,
            "workflows": len(self.workflows),
            "completed": self.completed,
            "ops_requested": self.ops_requested,
            "ops_executed": self.ops_executed,
            "worker_seconds": self.worker_seconds,
            "worker_cpu_s": self.worker_cpu_s,
            "overhead_s": self.overhead_s,
            "usd": self.usd,
            "energy_j": self.energy_j,
            "p50_s": self.latency(50),
            "p95_s": self.latency(95),
            "makespan_s": self.makespan_s,
            "setup_s": self.setup_s,
            "notes": self.notes,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "extra": self.extra,
            "per_workflow": [asdict(w) for w in self.workflows],
        }


def ratios(results: list[ModeResult], base: str = "isolated") -> dict[str, dict[str, float]]:
    """Every mode against `base`: how many times more worker-seconds, $ and J the base
    spent, and the mode's p50/p95 latency as a fraction of the base's."""
    by_mode = {r.mode: r for r in results}
    b = by_mode.get(base)
    if b is None:
        return {}
    out = {}
    for r in results:
        out[r.mode] = {
            "worker_seconds_base_over_mode": _div(b.worker_seconds, r.worker_seconds),
            "worker_cpu_base_over_mode": _div(b.worker_cpu_s, r.worker_cpu_s),
            "usd_base_over_mode": _div(b.usd, r.usd),
            "energy_base_over_mode": _div(b.energy_j, r.energy_j),
            "ops_executed_base_over_mode": _div(b.ops_executed, r.ops_executed),
            "p50_mode_over_base": _div(r.latency(50), b.latency(50)),
            "p95_mode_over_base": _div(r.latency(95), b.latency(95)),
        }
    return out


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def output_mismatches(results: list[ModeResult]) -> list[str]:
    """Workflows whose results differ between the modes that read them back (greedy
    decoding is deterministic: every mode must give the same bytes); one line each."""
    out = []
    first: dict[str, tuple[str, str]] = {}
    for r in results:
        for w in r.workflows:
            if not w.output_digest:
                continue
            seen = first.setdefault(w.workflow_id, (r.mode, w.output_digest))
            if seen[1] != w.output_digest:
                out.append(
                    f"{w.workflow_id}: {r.mode} {w.output_digest[:12]} != {seen[0]} {seen[1][:12]}"
                )
    return out
