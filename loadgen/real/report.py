"""Writing a real run down: results.json, a Markdown table, PNG plots (Agg backend)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowmesh.loadgen.pyplot import pyplot
from flowmesh.loadgen.real.results import ModeResult, ratios


def _f(v: float, fmt: str = ".2f") -> str:
    return "-" if not math.isfinite(v) else format(v, fmt)


BASES = ("isolated-lean", "isolated")  # the ratios are against each of these run


def markdown(title: str, results: Sequence[ModeResult]) -> str:
    """Modes as columns; the ratios against each baseline of BASES that ran below."""
    head = ["metric", *(r.mode for r in results)]
    rows: list[list[str]] = [
        ["workers", *(str(r.workers) for r in results)],
        ["workflows completed", *(f"{r.completed}/{len(r.workflows)}" for r in results)],
        ["operators requested", *(str(r.ops_requested) for r in results)],
        ["operators executed", *(str(r.ops_executed) for r in results)],
        ["worker-seconds", *(_f(r.worker_seconds) for r in results)],
        ["of which fleet overhead", *(_f(r.overhead_s) for r in results)],
        ["worker CPU-seconds", *(_f(r.worker_cpu_s) for r in results)],
        ["$ (worker time)", *(_f(r.usd, ".6f") for r in results)],
        ["energy (J)", *(_f(r.energy_j, ".0f") for r in results)],
        ["latency p50 (s)", *(_f(r.latency(50)) for r in results)],
        ["latency p95 (s)", *(_f(r.latency(95)) for r in results)],
        ["makespan (s)", *(_f(r.makespan_s) for r in results)],
        ["setup, not timed (s)", *(_f(r.setup_s, ".1f") for r in results)],
    ]
    digests = {w.workflow_id: w.output_digest for w in results[0].workflows} if results else {}
    rows.append(
        [
            f"results identical to {results[0].mode}" if results else "results",
            *(
                "-"
                if not any(w.output_digest for w in r.workflows)
                else "yes"
                if all(
                    not w.output_digest or w.output_digest == digests.get(w.workflow_id)
                    for w in r.workflows
                )
                else "NO"
                for r in results
            ),
        ]
    )
    for base in BASES:
        rat = ratios(list(results), base)
        if not rat:
            continue
        rows += [
            [
                f"worker-seconds {base} / mode",
                *(_f(rat[r.mode]["worker_seconds_base_over_mode"]) for r in results),
            ],
            [
                f"worker CPU-seconds {base} / mode",
                *(_f(rat[r.mode]["worker_cpu_base_over_mode"]) for r in results),
            ],
            [f"p50 mode / {base}", *(_f(rat[r.mode]["p50_mode_over_base"]) for r in results)],
            [f"p95 mode / {base}", *(_f(rat[r.mode]["p95_mode_over_base"]) for r in results)],
        ]
    lines = [f"**{title}**", "", _row(head), _row(["---"] + ["---:"] * len(results))]
    lines += [_row(r) for r in rows]
    lines += ["", *(f"- {r.mode}: {r.notes}" for r in results if r.notes)]
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: a missing figure is null
    path.write_text(json.dumps(_clean(doc), indent=2, sort_keys=True) + "\n")
    return path


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def run_doc(title: str, results: Sequence[ModeResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": title,
        **meta,
        "modes": {r.mode: r.as_dict() for r in results},
        "ratios_vs_isolated": ratios(list(results)),
        "ratios_vs_isolated_lean": ratios(list(results), "isolated-lean"),
    }


def plots(out: Path, title: str, results: Sequence[ModeResult]) -> list[Path]:
    """latency.png (per-workflow latency CDF per mode) and work.png (worker-seconds and
    operators executed per mode)."""
    plt = pyplot()
    if plt is None:
        return []

    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        lat = sorted(r.latencies())
        if lat:
            ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=r.mode)
    ax.set_xlabel("workflow latency (s)")
    ax.set_ylabel("fraction of workflows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    written.append(out / "latency.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    modes = [r.mode for r in results]
    a1.bar(modes, [r.worker_seconds for r in results], color="tab:blue")
    a1.set_title("worker-seconds")
    a2.bar(modes, [r.ops_executed for r in results], color="tab:orange")
    a2.set_title("operators executed")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "work.png", dpi=110)
    plt.close(fig)
    written.append(out / "work.png")
    return written


def bar_plot(path: Path, title: str, values: dict[str, float], ylabel: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(values), list(values.values()), color="tab:green")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
