"""The CAS on both backends: round trips, verification on read, no path games."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from topics import Bus
from topics.cas import CAS, BlobNotFound, CASError, CorruptBlob, FileBackend, open_cas
from topics.codec import canonical, sha256_hex


@pytest.fixture(params=["file", "nats"])
async def cas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CAS]:
    if request.param == "file":
        yield CAS(FileBackend(tmp_path / "cas"))
        return
    bus = await Bus.connect(request.getfixturevalue("nats_url"), name="test-cas")
    yield await open_cas("nats:", bus.js)
    await bus.close()


async def test_blob_round_trip_and_digest(cas: CAS) -> None:
    data = b"hello " * 1000
    digest = await cas.put(data)
    assert digest == sha256_hex(data)
    assert await cas.get(digest) == data
    assert await cas.exists(digest)
    assert await cas.put(data) == digest  # idempotent


async def test_records_manifests_tables(cas: CAS) -> None:
    rec = {"b": 2, "a": [1, "x"], "c": {"d": None}}
    d = await cas.put_record(rec)
    assert d == sha256_hex(canonical(rec))
    assert await cas.get_record(d) == rec
    m = await cas.put_manifest([d, d])
    assert await cas.get_manifest(m) == [d, d]
    rows = [{"id": i, "text": f"t{i}"} for i in range(5)]
    t = await cas.put_table(rows)
    assert await cas.get_table(t) == rows


async def test_missing_and_invalid_digests(cas: CAS) -> None:
    with pytest.raises(BlobNotFound):
        await cas.get("0" * 64)
    for bad in ["../../etc/passwd", "abc", "Z" * 64, "0" * 63 + "/"]:
        with pytest.raises(CASError):
            await cas.get(bad)


async def test_corruption_is_detected_on_read(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "cas")
    cas = CAS(backend)
    good = await cas.put(b"real content")
    other = await cas.put(b"other content")
    # swap the stored bytes of two objects: the digest check must catch it
    backend._path(good).write_bytes(backend._path(other).read_bytes())
    with pytest.raises(CorruptBlob):
        await cas.get(good)
    backend._path(other).write_bytes(b"not zstd at all")
    with pytest.raises(CorruptBlob):
        await cas.get(other)


async def test_mixed_type_records_get_a_clear_error(tmp_path: Path) -> None:
    cas = CAS(FileBackend(tmp_path))
    with pytest.raises(CASError, match="one table"):
        await cas.put_table([{"x": 1}, {"x": "one"}])


async def test_blob_limit(tmp_path: Path) -> None:
    cas = CAS(FileBackend(tmp_path), max_blob_bytes=10)
    with pytest.raises(CASError, match="exceeds"):
        await cas.put(b"x" * 11)
