"""What reading a large workflow's lineage costs, whole and a page at a time.

Starts a private fabric (nats-server, engine, 2 workers), runs map -> filter -> group over
N records (2N + 1 operators), then times the whole graph (build_lineage), one page of 500
operators from the middle of a node (what the gateway serves), and the first 20 operators
of each node (what `flowmesh lineage WF` shows), and prints the ratios.

    .venv/bin/python scripts/bench_lineage.py --records 30000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.lineage import build_lineage
from flowmesh.engine.lineage.pages import build_lineage_page
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.spec import parse_spec
from flowmesh.topics.api import Lineage, LineageCursor
from flowmesh.topics.lineage import collect_pages
from flowmesh.topics.messages import WorkflowSpec


def spec(n: int) -> WorkflowSpec:
    rows = [
        {"id": i, "text": f"item {i} is {'red' if i % 3 else 'blue'}", "colour": "x"}
        for i in range(n)
    ]
    return parse_spec(
        {
            "name": "bench-lineage",
            "datasets": {"src": {"records": rows}},
            "nodes": [
                {"name": "upper", "op": "map", "fn": "text.upper", "input": "src",
                 "params": {"field": "text"}},
                {"name": "reds", "op": "filter", "fn": "text.contains", "input": "upper",
                 "params": {"field": "text", "substring": "RED"}},
                {"name": "count", "op": "group", "input": "reds",
                 "params": {"by": "colour", "agg": "count"}},
            ],
        }
    )  # fmt: skip


async def bench(fabric: LocalFabric, n: int) -> None:
    async with await FlowMesh.connect(fabric.nats_url, fabric.cas_url) as fm:
        started = time.monotonic()
        wf = await fm.submit(spec(n))
        await fm.wait(wf, timeout=3600)
        print(f"ran {2 * n + 1} operators in {time.monotonic() - started:.1f} s")

        t = time.monotonic()
        whole = await build_lineage(fm, wf)
        whole_s = time.monotonic() - t
        t = time.monotonic()
        page = await build_lineage_page(fm, wf, page=LineageCursor("upper", n // 2))
        page_s = time.monotonic() - t

        async def fetch(cursor: LineageCursor | None, limit: int) -> Lineage:
            return await build_lineage_page(fm, wf, page=cursor, limit=limit)

        t = time.monotonic()
        table = await collect_pages(fetch, 20)
        table_s = time.monotonic() - t
    print(f"whole graph ({len(whole.ops)} operators): {whole_s:.2f} s")
    print(f"one page ({len(page.ops)} operators): {page_s:.2f} s ({whole_s / page_s:.0f}x less)")
    print(
        f"20 per node ({len(table.ops)} operators, flowmesh lineage's table): {table_s:.2f} s "
        f"({whole_s / table_s:.0f}x less)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        fabric = LocalFabric(
            data_dir=data,
            nats_url=f"nats://127.0.0.1:{free_port()}",
            cas_url=f"file://{data / 'cas'}",
            workers=2,
            worker_args=["--no-models"],
        )
        with fabric:
            asyncio.run(bench(fabric, args.records))


if __name__ == "__main__":
    main()
