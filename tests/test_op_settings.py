"""Settings reach the processes as arguments, never through the environment: the bus,
Kafka's servers and the scheduler as flags, and the limits that apply to an operator
(max_attempts, max_reclaims) with the operator itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from flowmesh.engine import service
from flowmesh.engine.cli import main
from flowmesh.engine.local import LocalFabric
from flowmesh.topics import codec
from flowmesh.topics.messages import Assignment, OpSpec, ReadyChunk, ReadyOp, chunks_of

ENV = ("FLOWMESH_BUS", "FLOWMESH_KAFKA", "FLOWMESH_SCHEDULER", "FLOWMESH_MAX_RECLAIMS")


def ready(key: str, max_reclaims: int) -> ReadyOp:
    spec = OpSpec("map", "map.text.upper", "1", "record", {}, None, [f"in-{key}"])
    return ReadyOp(key, spec, "bk", "wf", "t", max_attempts=2, max_reclaims=max_reclaims)


def test_max_reclaims_travels_with_the_operator_through_chunks_and_assignments() -> None:
    ops = [ready("a", 3), ready("b", 9)]
    (chunk,) = chunks_of(ops, 256)
    back = codec.decode(codec.encode(chunk), ReadyChunk).ops
    assert [(o.max_reclaims, o.max_attempts) for o in back] == [(3, 2), (9, 2)]
    assignment = Assignment.of("batch", "w0", back, 1.0)
    again = codec.decode(codec.encode(assignment), Assignment).ops
    assert [o.max_reclaims for o in again] == [3, 9]
    # a chunk published before operators carried it reads as the old default, 6
    old = msgspec.json.decode(codec.encode(chunk))
    for item in old["items"]:
        del item["max_reclaims"]
    assert [o.max_reclaims for o in codec.decode(codec.encode(old), ReadyChunk).ops] == [6, 6]


def test_engine_flags_reach_the_engine_as_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    seen: dict[str, Any] = {}

    async def serve(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(service, "serve", serve)
    argv = ["engine", "--nats", "nats://127.0.0.1:1", "--bus", "kafka", "--kafka", "k:9"]
    argv += ["--scheduler", "faust", "--max-reclaims", "4", "--max-attempts", "2"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert (seen["kafka"], seen["scheduler"]) == ("k:9", "faust")
    assert (seen["max_reclaims"], seen["max_attempts"]) == (4, 2)
    assert not {name for name in ENV if name in os.environ}  # nothing written

    # without flags: the environment, read by the settings, still says
    seen.clear()
    monkeypatch.setenv("FLOWMESH_BUS", "nats")
    monkeypatch.setenv("FLOWMESH_MAX_RECLAIMS", "5")
    result = CliRunner().invoke(main, ["engine", "--nats", "nats://127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    assert (seen["kafka"], seen["scheduler"], seen["max_reclaims"]) == ("", "live", 5)
    bad = CliRunner().invoke(main, ["engine", "--max-reclaims", "2"])
    assert bad.exit_code == 2 and "--max-reclaims" in bad.output


def test_up_hands_bus_and_scheduler_to_its_children_as_flags(tmp_path: Path) -> None:
    fabric = LocalFabric(
        data_dir=tmp_path,
        nats_url="nats://127.0.0.1:1",
        cas_url="file:///x",
        bus="kafka",
        kafka="k:9",
        scheduler="faust",
    )
    for command in ("engine", "planner", "scheduler", "gateway"):
        argv = fabric._engine_argv(command)
        assert argv[argv.index("--bus") + 1] == "kafka" and "--kafka" in argv
    assert fabric._scheduler_args() == ["--scheduler", "faust"]
    assert fabric.kafka_servers == "k:9"
    # told nothing, it passes nothing: each process reads its own settings
    plain = LocalFabric(data_dir=tmp_path, nats_url="nats://127.0.0.1:1", cas_url="file:///x")
    assert "--bus" not in plain._engine_argv("engine") and plain.kafka_servers is None
