"""Direct submit holds a dataset file to the documented dataset limits (README, "Dataset
size"): a clear error, nothing uploaded and nothing submitted (issue 13 item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowmesh.engine import client as client_mod
from flowmesh.engine import spec as spec_mod
from flowmesh.engine.client import FlowMesh
from flowmesh.engine.spec import MAX_DATASET_BYTES, SpecError, parse_spec
from flowmesh.topics import codec, streams
from flowmesh.topics.messages import SubmitWorkflow


def _spec(path: Path) -> object:
    return parse_spec(
        {
            "name": "big",
            "tenant": "acme",
            "datasets": {"src": {"path": str(path)}},
            "nodes": [
                {
                    "name": "m",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "src",
                    "params": {"field": "text"},
                }
            ],
        }
    )


def _write_jsonl(path: Path, target_bytes: int) -> int:
    line = json.dumps({"text": "x" * 1000}) + "\n"
    n = target_bytes // len(line) + 1
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(line)
    return n


async def _nothing_submitted(fm: FlowMesh, cas_dir: Path) -> None:
    info = await fm.bus.js.stream_info(streams.STREAM_SUBMIT)
    assert info.state.messages == 0
    assert not any(p.is_file() for p in cas_dir.rglob("*"))


async def test_a_dataset_file_over_the_limit_is_refused_with_the_limit_named(
    nats_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    _write_jsonl(path, MAX_DATASET_BYTES + 1_000_000)  # just past it: read, then refused
    cas_dir = tmp_path / "cas"
    async with await FlowMesh.connect(nats_url, f"file://{cas_dir}") as fm:
        with pytest.raises(SpecError) as info:
            await fm.submit(_spec(path), check_executors=False)  # type: ignore[arg-type]
        text = str(info.value)
        assert f"more than {MAX_DATASET_BYTES} bytes" in text
        assert "dataset 'src'" in text and "split" in text
        await _nothing_submitted(fm, cas_dir)


async def test_a_file_far_over_the_limit_is_refused_before_it_is_read(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a smaller limit, so the test does not write hundreds of MB; the rule is the same
    limit = 200_000
    monkeypatch.setattr(client_mod, "MAX_DATASET_BYTES", limit)
    monkeypatch.setattr(spec_mod, "MAX_DATASET_BYTES", limit)
    path = tmp_path / "huge.jsonl"
    _write_jsonl(path, 3 * limit)
    # read, this line would fail as "cannot read dataset": refused by size, it is not
    path.write_text(path.read_text() + "{not json\n")
    cas_dir = tmp_path / "cas"
    async with await FlowMesh.connect(nats_url, f"file://{cas_dir}") as fm:
        with pytest.raises(SpecError) as info:
            await fm.submit(_spec(path), check_executors=False)  # type: ignore[arg-type]
        assert f"the limit is {limit} bytes per dataset" in str(info.value)
        await _nothing_submitted(fm, cas_dir)


async def test_a_dataset_file_within_the_limit_is_uploaded_and_submitted(
    nats_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "ok.jsonl"
    n = _write_jsonl(path, 2_000_000)
    async with await FlowMesh.connect(nats_url, f"file://{tmp_path / 'cas'}") as fm:
        wf = await fm.submit(_spec(path), check_executors=False)  # type: ignore[arg-type]
        msg = await fm.bus.js.get_msg(streams.STREAM_SUBMIT, seq=1)
        sub = codec.decode(msg.data or b"", SubmitWorkflow)
        assert sub.workflow_id == wf
        digest = sub.spec.datasets["src"].digest
        assert digest is not None
        assert len(await fm.cas.get_table(digest)) == n
