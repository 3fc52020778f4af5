"""How long the live autoscaler's per-round read of the workflows takes as they grow.

Usage: python scripts/bench_workflow_book.py 1000 5000 20000

Starts a private nats-server, writes that many workflow status entries (a 5-node RLHF
round, 1.3 kB, one in four running) to KV fm_wf, and times `Autoscaler._workflows()`
three rounds in a row at each size, then one more after 100 running workflows update.
The first round at a size reads every entry written since the last one.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from flowmesh.engine.autoscaler import Autoscaler, AutoscalerConfig, ClassPolicy
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.engine.providers import Provider
from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.messages import NodeSpec, NodeStatus, WorkflowStatus


class NoProvider(Provider):
    async def replicas(self, device_class: str) -> int:
        return 0

    async def scale(self, device_class: str, replicas: int, retire: Sequence[str] = ()) -> None:
        return None


def status(i: int, running: bool) -> WorkflowStatus:
    def node(name: str, op: str, inputs: list[str], total: int = 0, done: int = 0) -> NodeStatus:
        model = "m" if op in ("generate", "score", "train") else None
        fn = "f" if op in ("map", "group") else None
        spec = NodeSpec(name=name, op=op, inputs=inputs, model=model, fn=fn)
        return NodeStatus(spec=spec, total=total, done=done)

    nodes = {
        "samples": node("samples", "generate", ["prompts"], total=512, done=200),
        "rewards": node("rewards", "score", ["samples"], total=100, done=50),
        "best": node("best", "group", ["rewards"]),
        "sft": node("sft", "train", ["best"]),
        "eval": node("eval", "generate", ["sft"]),
    }
    now = time.time()
    return WorkflowStatus(
        f"wf{i:06d}", "round", f"t{i % 32}", "running" if running else "completed",
        now - 60, now, nodes,
    )  # fmt: skip


async def main(sizes: list[int]) -> None:
    data = Path(tempfile.mkdtemp())
    fab = LocalFabric(
        data_dir=data,
        nats_url=f"nats://127.0.0.1:{free_port()}",
        cas_url=f"file://{data}/cas",
        workers=0,
    )
    fab.ensure_nats()
    try:
        bus = await Bus.connect(fab.nats_url, name="bench-workflow-book")
        config = AutoscalerConfig(classes=(ClassPolicy("cpu", 0, 3, ops_per_s=1.0),))
        scaler = Autoscaler(bus, NoProvider(), config)
        kv = await bus.kv(streams.KV_WF)
        have = 0
        for n in sizes:
            writes = [
                (f"wf{i:06d}", codec.encode(status(i, i % 4 == 0)), 0) for i in range(have, n)
            ]
            for start in range(0, len(writes), 2000):
                await bus.kv_write_many(streams.KV_WF, writes[start : start + 2000], timeout=60)
            have = n
            rounds = []
            for _ in range(3):
                t0 = time.perf_counter()
                await scaler._workflows()
                rounds.append(time.perf_counter() - t0)
            for i in range(0, min(n, 400), 4):
                await kv.put(f"wf{i:06d}", codec.encode(status(i, True)))
            t0 = time.perf_counter()
            running = (await scaler._workflows())[0]
            after = time.perf_counter() - t0
            ms = ", ".join(f"{r * 1000:.0f}" for r in rounds)
            print(
                f"{n} workflows ({running} running): rounds {ms} ms; "
                f"after 100 updates {after * 1000:.0f} ms",
                flush=True,
            )
        await scaler.close()
        await bus.close()
    finally:
        fab.stop()


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1000, 5000, 20000]))
