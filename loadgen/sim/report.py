"""Presenting a comparison: one rich table, results.json, and PNG plots (Agg backend)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from flowmesh.loadgen.pyplot import pyplot
from flowmesh.loadgen.sim.metrics import PolicyResult, ratios


def _x(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.2f}x"


def _s(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v / 60:.1f} min" if v >= 600 else f"{v:.0f} s"


def table(title: str, results: Sequence[PolicyResult]) -> Table:
    """Metrics as rows, policies as columns; at the bottom, ratios against the strongest
    baseline on each metric (named in the row)."""
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for r in results:
        t.add_column(r.policy, justify="right")
    rows: list[tuple[str, Any]] = [
        ("workflows done", lambda r: f"{r.completed}/{r.workflows}"),
        ("$ cost", lambda r: f"${r.cost_usd:,.2f}"),
        ("energy", lambda r: f"{r.energy_kwh:,.2f} kWh"),
        ("makespan", lambda r: _s(r.makespan_s)),
        ("latency p50", lambda r: _s(r.latency_p50_s)),
        ("latency p95", lambda r: _s(r.latency_p95_s)),
        ("latency p99", lambda r: _s(r.latency_p99_s)),
        ("GPU utilisation", lambda r: f"{100 * r.gpu_util:.0f}%"),
        ("GPU hours (busy)", lambda r: f"{r.gpu_hours:,.2f} ({r.gpu_busy_hours:,.2f})"),
        ("peak GPUs allocated", lambda r: f"{r.peak_gpus:,}"),
        ("ops requested", lambda r: f"{r.ops_requested:,}"),
        ("ops executed", lambda r: f"{r.ops_executed:,}"),
        (
            "dedup hits (in flight)",
            lambda r: (
                f"{r.dedup_hits:,} ({r.dedup_hits_inflight:,})"
                f" {100 * r.dedup_hits / max(r.ops_requested, 1):.0f}%"
            ),
        ),
        ("batches", lambda r: f"{r.batches:,}"),
        ("mean batch size", lambda r: f"{r.mean_batch_size:.1f}"),
        ("mean GPU batch size", lambda r: f"{r.mean_gpu_batch_size:.1f}"),
        ("model loads", lambda r: f"{r.model_loads:,}"),
        ("preemptions (replayed ops)", lambda r: f"{r.preemptions} ({r.replayed_ops:,})"),
    ]
    for name, fmt in rows:
        t.add_row(name, *(fmt(r) for r in results))
    rat = ratios({r.policy: r for r in results})
    if rat:
        against = rat["against"]
        t.add_section()
        for key, label in (
            ("cost_reduction_x", "cost reduction vs {}"),
            ("energy_reduction_x", "energy reduction vs {}"),
            ("p50_latency_ratio", "p50 latency / {}"),
            ("p95_latency_ratio", "p95 latency / {}"),
            ("p99_latency_ratio", "p99 latency / {}"),
        ):
            t.add_row(
                label.format(f"best baseline ({against[key]})"),
                *(_x(rat[r.policy][key]) for r in results),
            )
    return t


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def plots(out: Path, title: str, results: Sequence[PolicyResult]) -> list[Path]:
    """cost_energy.png (bars per policy) and latency_cdf.png (workflow latency CDF)."""
    plt = pyplot()
    if plt is None:
        return []

    out.mkdir(parents=True, exist_ok=True)
    names = [r.policy for r in results]
    colors = {
        "flowmesh": "#2a9d8f",
        "reference": "#264653",
        "shared-fifo": "#e9c46a",
        "isolated-lean": "#f4a261",
        "isolated-dedicated": "#e76f51",
    }
    col = [colors.get(n, "#888888") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, values, label in (
        (axes[0], [r.cost_usd for r in results], "$ cost"),
        (axes[1], [r.energy_kwh for r in results], "energy (kWh)"),
        (axes[2], [r.latency_p95_s for r in results], "p95 workflow latency (s)"),
    ):
        bars = ax.bar(names, values, color=col)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title)
    fig.tight_layout()
    p1 = out / "cost_energy.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r, c in zip(results, col, strict=True):
        lat = sorted(r.latencies_s)
        if not lat:
            continue
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ax.step(lat, ys, where="post", label=r.policy, color=c)
    ax.set_xlabel("workflow latency, arrival -> completion (s)")
    ax.set_ylabel("fraction of workflows")
    ax.set_title(f"{title}: latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p2 = out / "latency_cdf.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]
