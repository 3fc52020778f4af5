"""`loadgen overhead`: what the fabric costs per operator, against the physical limit.

Three measurements in one run, on one nats-server (and, with `--bus kafka`, one Kafka
broker that carries the streams):
- raw: N messages published to a JetStream stream (async publish, file storage, like
  FlowMesh's streams) while a pull consumer fetches and acks them: the bus alone. On
  Kafka: N records produced to a one-partition topic (acks=all, linger 1 ms, as
  FlowMesh's producer) while a consumer of a group fetches them and commits its offset
  after each fetch.
- fabric: one workflow of N no-op map operators (`bench.noop`, a transform that returns
  its record) through the whole fabric: client upload, planner (keys, dedup KV entry,
  request record, ready publish), scheduler (pool, policy, assignment), worker (KV
  state, CAS input, executor, CAS output, compare-and-set commit, done publish) and the
  planner's completion. Timed from submit to the workflow's completed status.
- ray: the same N operators as N Ray tasks calling the same transform executor.

With `--profile DIR` the engine and worker processes run under pyinstrument and leave
a text profile each in DIR (written when they stop).

The server's own statistics are read before and after the fabric's run (its monitoring
endpoint: /varz messages in and out, /jsz JetStream API requests; each stream's last
sequence: the messages and KV writes it stored), so the per-operator cost of the
protocol is counted by the bus, not by the fabric's code.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric, free_port
from flowmesh.loadgen.real.results import Progress, no_progress
from flowmesh.topics.bus import transport
from flowmesh.topics.messages import DatasetSpec, NodeSpec, WorkflowSpec

RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw"
PUBLISH_WINDOW = 1000  # publishes in flight before waiting for their acks


@dataclass
class OverheadResult:
    ops: int
    workers: int
    payload_bytes: int
    raw_s: float
    fabric_s: float
    bus: str = "nats"
    ray_s: float | None = None
    kv: str = "nats"  # kafka: a Kafka-only fabric (no nats-server at all)
    fabric_accept_s: float = 0.0  # submit -> the planner's first status
    notes: list[str] = field(default_factory=list)
    # the server's counters over the fabric's run, per operator (ServerStats.per_op)
    server_per_op: dict[str, float] = field(default_factory=dict)

    def rate(self, seconds: float | None) -> float:
        return self.ops / seconds if seconds else float("nan")

    def summary(self) -> dict[str, Any]:
        raw, fab = self.rate(self.raw_s), self.rate(self.fabric_s)
        ray = self.rate(self.ray_s)
        return {
            **asdict(self),
            "raw_ops_per_s": raw,
            "fabric_ops_per_s": fab,
            "ray_ops_per_s": ray,
            "fabric_over_raw": fab / raw,
            "fabric_over_ray": fab / ray if self.ray_s else float("nan"),
        }


@dataclass
class ServerStats:
    """What nats-server counted: messages clients sent it (publishes, requests, acks),
    messages it sent clients, JetStream API requests, and messages stored per stream
    (a KV bucket is a stream: one per write)."""

    msgs_in: int
    msgs_out: int
    api_requests: int
    stored: dict[str, int]

    def per_op(self, before: ServerStats, ops: int) -> dict[str, float]:
        stored = {
            name: (seq - before.stored.get(name, 0)) / ops for name, seq in self.stored.items()
        }
        return {
            "client_msgs_in": (self.msgs_in - before.msgs_in) / ops,
            "server_msgs_out": (self.msgs_out - before.msgs_out) / ops,
            "js_api_requests": (self.api_requests - before.api_requests) / ops,
            "stored_writes": sum(stored.values()),
            **{f"stored.{name}": v for name, v in sorted(stored.items()) if v},
        }


def _monitor_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


async def server_stats(nats_url: str, monitor_url: str) -> ServerStats:
    varz = await asyncio.to_thread(_monitor_json, f"{monitor_url}/varz")
    jsz = await asyncio.to_thread(_monitor_json, f"{monitor_url}/jsz")
    nc = await nats.connect(nats_url, name="loadgen-stats")
    try:
        js = nc.jetstream(timeout=10.0)
        stored = {s.config.name or "": s.state.last_seq for s in await js.streams_info()}
    finally:
        await nc.close()
    api = jsz.get("api") or {}
    return ServerStats(
        int(varz.get("in_msgs", 0)),
        int(varz.get("out_msgs", 0)),
        int(api.get("total", 0)),
        stored,
    )


class ProfiledFabric(LocalFabric):
    """A LocalFabric whose Python processes run under pyinstrument (text profiles), and
    whose nats-server serves its monitoring endpoint (the protocol's counters)."""

    profile_dir: Path | None = None
    monitor_port: int | None = None

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        if name == "nats-server":
            self.monitor_port = free_port()
            argv = [*argv, "-m", str(self.monitor_port)]
        if self.profile_dir is not None and argv[:2] == [sys.executable, "-m"]:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = str(self.profile_dir / f"{name}.txt")
            argv = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", out, *argv[1:]]
        return super()._spawn(name, argv)


async def raw_jetstream(nats_url: str, n: int, payload_bytes: int) -> float:
    """Seconds to publish n messages to a stream and pull + ack them all (concurrently)."""
    nc = await nats.connect(nats_url, name="loadgen-overhead")
    js = nc.jetstream(timeout=10.0)
    try:
        await js.add_stream(
            StreamConfig(
                name=RAW_STREAM,
                subjects=[RAW_SUBJECT],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        psub = await js.pull_subscribe(RAW_SUBJECT, durable="bench-raw", stream=RAW_STREAM)
        data = b"x" * payload_bytes
        t0 = time.perf_counter()

        async def produce() -> None:
            pending = []
            for _ in range(n):
                pending.append(await js.publish_async(RAW_SUBJECT, data))
                if len(pending) >= PUBLISH_WINDOW:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)

        async def consume() -> None:
            got = 0
            while got < n:
                try:
                    msgs = await psub.fetch(256, timeout=5.0)
                except TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got += len(msgs)

        await asyncio.gather(produce(), consume())
        await nc.flush()
        seconds = time.perf_counter() - t0
        await js.delete_stream(RAW_STREAM)
        return seconds
    finally:
        await nc.close()


async def raw_kafka(bootstrap: str, n: int, payload_bytes: int) -> float:
    """Seconds to produce n records to a topic and consume + commit them all
    (concurrently), with the producer settings FlowMesh's own streams use."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    tp = TopicPartition(RAW_SUBJECT, 0)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="loadgen-overhead")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, client_id="loadgen-overhead", acks="all", linger_ms=1
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="loadgen-overhead",
        group_id="bench-raw",
        enable_auto_commit=False,
    )
    await admin.start()
    try:
        await admin.create_topics([NewTopic(RAW_SUBJECT, 1, 1)])
        await producer.start()
        await consumer.start()
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        data = b"x" * payload_bytes
        t0 = time.perf_counter()

        async def produce() -> None:
            pending = []
            for _ in range(n):
                pending.append(await producer.send(RAW_SUBJECT, data, partition=0))
                if len(pending) >= PUBLISH_WINDOW:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)

        async def consume() -> None:
            got = 0
            while got < n:
                batches = await consumer.getmany(tp, timeout_ms=5000, max_records=256)
                recs = batches.get(tp, [])
                if recs:
                    await consumer.commit({tp: recs[-1].offset + 1})
                got += len(recs)

        await asyncio.wait_for(asyncio.gather(produce(), consume()), timeout=600)
        return time.perf_counter() - t0
    finally:
        for client in (consumer, producer):
            await client.stop()
        await admin.close()


def noop_spec(n: int) -> WorkflowSpec:
    return WorkflowSpec(
        name="overhead-noop",
        tenant="bench",
        datasets={"data": DatasetSpec(records=[{"i": i} for i in range(n)])},
        nodes=[NodeSpec(name="noop", op="map", fn="bench.noop", inputs=["data"])],
    )


async def fabric_noop(
    fab: ProfiledFabric, n: int, timeout_s: float
) -> tuple[float, float, dict[str, float]]:
    """(seconds from submit to completed, seconds from submit to the first status,
    the server's counters per operator over that time)."""
    async with await FlowMesh.connect(
        fab.nats_url, fab.cas_url, kafka=fab.kafka_servers, kv=fab.kv
    ) as fm:
        deadline = time.monotonic() + 300
        while len(await fm.workers()) < fab.workers:
            if time.monotonic() > deadline or not all(fab.alive().values()):
                raise RuntimeError(f"fabric did not come up; logs in {fab.log_dir}")
            await asyncio.sleep(0.2)
        # a Kafka-only fabric has no nats-server to count its requests
        counted = not fab.kafka_only
        before = await server_stats(fab.nats_url, fab.monitor_url) if counted else None
        accepted: list[float] = []
        t0 = time.perf_counter()
        wf = await fm.submit(noop_spec(n), "overhead-noop")

        def seen(_: Any) -> None:
            if not accepted:
                accepted.append(time.perf_counter() - t0)

        st = await fm.wait(wf, timeout=timeout_s, on_update=seen)
        seconds = time.perf_counter() - t0
        if st.state != "completed" or st.nodes["noop"].done != n:
            raise RuntimeError(f"overhead workflow did not complete: {st.state} {st.error}")
        if before is None:
            return seconds, accepted[0] if accepted else seconds, {}
        after = await server_stats(fab.nats_url, fab.monitor_url)
        return seconds, accepted[0] if accepted else seconds, after.per_op(before, n)


def ray_noop(n: int, workers: int) -> float:
    import ray

    from flowmesh.loadgen.real.ray_mode import noop_task, ray_init, warm

    ray_init(workers)
    try:
        task = ray.remote(num_cpus=1)(noop_task)
        ray.get([ray.remote(num_cpus=1)(warm).remote(None) for _ in range(workers)])
        t0 = time.perf_counter()
        out = ray.get([task.remote({"i": i}) for i in range(n)])
        seconds = time.perf_counter() - t0
        if len(out) != n:
            raise RuntimeError("ray lost operators")
        return seconds
    finally:
        ray.shutdown()


async def run_overhead(
    n: int,
    out_dir: Path,
    workers: int = 2,
    payload_bytes: int = 256,
    with_ray: bool = True,
    profile_dir: Path | None = None,
    timeout_s: float = 1800.0,
    progress: Progress = no_progress,
    bus: str = "nats",
    kv: str = "nats",
) -> OverheadResult:
    """`kv` "kafka" (with `bus` "kafka"): a Kafka-only fabric, no nats-server started."""
    if bus not in transport.BUSES or kv not in transport.BUSES:
        raise ValueError(
            f"bus {bus!r}, kv {kv!r}: each must be one of {', '.join(transport.BUSES)}"
        )
    if kv == "kafka" and bus != "kafka":
        raise ValueError("kv 'kafka' needs bus 'kafka' (a Kafka-only fabric)")
    fab = ProfiledFabric(
        data_dir=out_dir / "fabric",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        cas_url=f"file://{out_dir / 'fabric' / 'cas'}",
        workers=workers,
        worker_args=["--no-models", "--plugin", "flowmesh.loadgen.real.noop"],
        # a burst of 20k operators keeps the engine's loop busy: do not take a worker
        # whose heartbeat it reads late for dead (reclaiming would be measured too)
        engine_args=["--dead-after", "30"],
    )
    fab.profile_dir = profile_dir
    steps = 3 if with_ray else 2
    broker: subprocess.Popen[bytes] | None = None
    try:
        if kv == "kafka":
            fab.kv = "kafka"  # Kafka-only: no nats-server at all
        else:
            fab.ensure_nats()  # one server for both the raw and the fabric measurement
        if bus == "kafka":
            from flowmesh.loadgen.real.kafka_broker import start_tansu

            port = free_port()
            broker = start_tansu(port, out_dir / "fabric" / "logs" / "tansu.log")
            bootstrap = f"127.0.0.1:{port}"
            # the engine and workers are told by flags, this process's client by
            # fab.kafka_servers
            fab.bus, fab.kafka = "kafka", bootstrap
        progress("overhead", 0, steps)
        if bus == "kafka":
            raw_s = await raw_kafka(bootstrap, n, payload_bytes)
        else:
            raw_s = await raw_jetstream(fab.nats_url, n, payload_bytes)
        progress("overhead", 1, steps)
        fab.start_engine()
        for _ in range(workers):
            fab.start_worker()
        fabric_s, accept_s, per_op = await fabric_noop(fab, n, timeout_s)
        progress("overhead", 2, steps)
    finally:
        fab.stop()
        if broker is not None:
            os.kill(broker.pid, signal.SIGKILL)
            broker.wait()
    result = OverheadResult(
        n, workers, payload_bytes, raw_s, fabric_s, bus=bus, fabric_accept_s=accept_s, kv=kv
    )
    result.server_per_op = per_op
    if with_ray:
        result.ray_s = await asyncio.to_thread(ray_noop, n, workers)
        progress("overhead", 3, steps)
    return result


def raw_label(bus: str) -> str:
    if bus == "kafka":
        return "raw Kafka produce + consume/commit"
    return "raw JetStream publish + pull/ack"


def overhead_markdown(r: OverheadResult) -> str:
    s = r.summary()
    raw_name = raw_label(r.bus)
    rows = [
        (raw_name, r.raw_s, s["raw_ops_per_s"]),
        ("FlowMesh fabric, no-op operators", r.fabric_s, s["fabric_ops_per_s"]),
    ]
    if r.ray_s is not None:
        rows.append(("Ray tasks, same executor", r.ray_s, s["ray_ops_per_s"]))
    lines = [
        f"**{r.ops} operators, {r.workers} workers, streams on {r.bus}"
        + (", KV on kafka (no nats-server)" if r.kv == "kafka" else "")
        + "**",
        "",
        "| path | seconds | ops/s |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {sec:.2f} | {rate:,.0f} |" for name, sec, rate in rows),
        "",
        f"fabric / raw {'Kafka' if r.bus == 'kafka' else 'JetStream'}: {s['fabric_over_raw']:.3f}",
    ]
    if r.ray_s is not None:
        lines.append(f"fabric / Ray: {s['fabric_over_ray']:.2f}")
    if r.server_per_op:
        lines += [
            "",
            "per operator, counted by nats-server over the fabric's run:",
            "",
            "| counter | per op |",
            "| --- | ---: |",
            *(f"| {k} | {v:.2f} |" for k, v in r.server_per_op.items()),
        ]
    return "\n".join(lines) + "\n"
