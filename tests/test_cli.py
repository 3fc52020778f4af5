"""The CLI's conventions and the one settings object: help on every option, --version,
-h, flags > environment > file, a fast clear failure without NATS, tables on stdout,
machine output unwrapped, and client commands that find the fabric's data from any
folder (or say why not)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from flowmesh import Client, Settings, SettingsError
from flowmesh.engine.cli import main
from flowmesh.engine.local import free_port
from flowmesh.workers.main import main as worker_main
from tests.conftest import MakeFabric
from tests.workflows import map_then_count


def commands(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from commands(sub, [*path, name])
    yield path, cmd


def test_every_option_has_help_text() -> None:
    missing = [
        f"{' '.join(path)} {'/'.join(p.opts)}"
        for root, name in ((main, "flowmesh"), (worker_main, "flowmesh-worker"))
        for path, cmd in commands(root, [name])
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden and not p.help
    ]
    assert missing == []


def test_version_and_short_help() -> None:
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("flowmesh ")
    for argv in (["-h"], ["status", "-h"], ["cache", "ls", "-h"]):
        res = runner.invoke(main, argv)
        assert res.exit_code == 0 and "Usage:" in res.output, argv
    assert "Usage:" in runner.invoke(worker_main, ["-h"]).output


def test_settings_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "flowmesh.toml"
    file.write_text('nats = "nats://from-file:4222"\ndata_dir = "data"\nmax_attempts = 5\n')
    env = {"FLOWMESH_NATS": "nats://from-env:4222", "FLOWMESH_MAX_RECLAIMS": "4"}
    s = Settings.load({"nats": "nats://from-flag:4222"}, env=env, file=file)
    assert s.nats == "nats://from-flag:4222"
    assert (s.max_attempts, s.max_reclaims) == (5, 4)  # file, environment
    # a relative data_dir in the file is relative to the file; the CAS follows it
    assert s.data_dir == tmp_path / "data" and s.cas_url == f"file://{tmp_path / 'data' / 'cas'}"
    assert Settings.load(env=env, file=file).nats == "nats://from-env:4222"
    assert Settings.load(env={}, file=file).nats == "nats://from-file:4222"
    assert "FLOWMESH_NATS" not in os.environ or os.environ["FLOWMESH_NATS"] != s.nats


def test_bad_settings_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"\$FLOWMESH_MAX_ATTEMPTS='many'"):
        Settings.load(env={"FLOWMESH_MAX_ATTEMPTS": "many"})
    with pytest.raises(SettingsError, match=r"--bus='pigeon' must be one of nats, kafka"):
        Settings.load({"bus": "pigeon"}, env={})
    bad = tmp_path / "flowmesh.toml"
    bad.write_text('nats_url = "x"\n')
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.load(env={}, file=bad)


def test_worker_cas_follows_its_data_dir(tmp_path: Path) -> None:
    """--data-dir alone moves the worker's CAS with it (it used to stay in ./.flowmesh)."""
    s = Settings.load(env={}).updated(data_dir=str(tmp_path / "d"))
    assert s.cas_url == f"file://{tmp_path / 'd' / 'cas'}"
    assert s.models_dir == tmp_path / "d" / "models"


def test_no_nats_fails_fast_and_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "FLOWMESH_CONNECT_TIMEOUT": "1"}
    url = f"nats://127.0.0.1:{free_port()}"
    for argv in (["status"], ["status", "wf-x", "--json"], ["result", "wf-x", "n"]):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "flowmesh.engine.cli", *argv, "--nats", url],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 1, argv
        assert "no NATS server reachable at 127.0.0.1" in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert time.monotonic() - started < 20
    # and no log line or data directory left in the folder it ran in, beyond the log file
    assert not (tmp_path / ".flowmesh" / "cas").exists()


@pytest.mark.slow
async def test_client_commands_agree_with_the_fabric_from_any_folder(
    make_fabric: MakeFabric, tmp_path: Path
) -> None:
    fabric = make_fabric(workers=1)
    rows = [{"text": f"a rather long item number {i} " * 4, "colour": "red"} for i in range(3)]
    async with await Client.connect(fabric.nats_url) as client:
        wf = await client.submit(map_then_count("cli-dirs", rows, "text.upper"))
        await client.wait(wf, timeout=120)
    elsewhere = tmp_path / "some" / "other" / "folder"
    elsewhere.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWMESH_")}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowmesh.engine.cli", *argv, "--nats", fabric.nats_url],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=elsewhere,
        )

    result = await asyncio.to_thread(cli, "result", wf, "up")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == [
        r["text"].upper() for r in rows
    ]
    assert not (elsewhere / ".flowmesh" / "cas").exists()  # read the fabric's, made none

    table = await asyncio.to_thread(cli, "status", wf)
    assert table.returncode == 0 and "count" in table.stdout and "up" in table.stdout
    assert table.stderr == ""  # the table is the answer: stdout
    listing = await asyncio.to_thread(cli, "status", "--json")
    assert any(s["workflow_id"] == wf for s in json.loads(listing.stdout))
    one = await asyncio.to_thread(cli, "status", wf, "--json")
    assert len(one.stdout.strip().splitlines()) == 1  # never wrapped
    assert json.loads(one.stdout)["workflow_id"] == wf

    wrong = await asyncio.to_thread(cli, "result", wf, "up", "--data-dir", str(elsewhere / "d"))
    assert wrong.returncode == 1
    assert str(tmp_path / "data" / "cas") in wrong.stderr.replace("\n", "")
    assert "Traceback" not in wrong.stderr
    assert not (elsewhere / "d").exists()
