"""Content-addressed store: where every payload lives; the bus carries only digests.

A blob's digest is the SHA-256 of its uncompressed bytes. Backends store the
zstd-compressed bytes under the digest; `CAS.get` decompresses and verifies the digest,
so a corrupted or swapped object is an error, never a wrong result.

Layouts: a record is its canonical JSON; a manifest is the canonical JSON list of record
digests; a table (source datasets, exported results) is Arrow IPC.

Backends (the `BlobBackend` protocol): local files (the embedded default) and the NATS
JetStream object store and S3-compatible stores (topics/store/s3.py).

Safety: a blob's name is its digest and nothing else (`check_name`: 64 lowercase hex
characters), checked by the CAS *and* again by every backend, so no name can reach a path
outside the store, a second object for the same content, or another object's name. A put
that claims a digest its content does not have is refused; a get verifies the digest.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.ipc as ipc
import zstandard

from flowmesh.topics.codec import canonical, is_digest, sha256_hex

Record = dict[str, Any]


class CASError(Exception):
    pass


class BlobNotFound(CASError):
    pass


class CorruptBlob(CASError):
    pass


class DigestMismatch(CASError):
    """A put claimed a digest its content does not have."""


def check_name(name: object) -> str:
    """The name of a blob, which must be a content digest (64 lowercase hex characters):
    no separators, dots, NULs, newlines or upper case, so no path traversal, no absolute
    path, and no second spelling of an object. Every backend calls this before touching
    storage, whoever its caller is."""
    if not is_digest(name):
        raise CASError(f"not a content digest: {name!r}"[:200])
    assert isinstance(name, str)  # is_digest checked it
    return name


class BlobBackend(Protocol):
    async def put(self, name: str, data: bytes) -> None: ...
    async def get(self, name: str) -> bytes | None: ...
    async def exists(self, name: str) -> bool: ...
    async def delete(self, name: str) -> None: ...

    # (digest, modification time as a unix timestamp) of every stored blob, in no
    # particular order; an async generator
    def list(self) -> AsyncIterator[tuple[str, float]]: ...


# put_many writes this many blobs, of this many bytes in all, without a thread hop
INLINE_FILES = 4
INLINE_FILE_BYTES = 64 * 1024


class FileBackend:
    """Blobs as files under root/ab/cd/<digest>.zst, written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        # a validated digest cannot name anything outside root/ab/cd/; checked here too,
        # not only in CAS, because gc and other backends' callers reach us directly
        name = check_name(name)
        return self.root / name[:2] / name[2:4] / f"{name}.zst"

    async def put(self, name: str, data: bytes) -> None:
        self._put_sync(name, data)

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Write many blobs in one thread hop: file writes would block the event loop.
        A few small ones are written here, as `put` writes one: the hop to a thread and
        back costs more than they do (a record operator's result is one small blob)."""
        if len(items) <= INLINE_FILES and sum(len(b) for _, b in items) <= INLINE_FILE_BYTES:
            self._put_many_sync(items)
            return
        await asyncio.to_thread(self._put_many_sync, items)

    def _put_many_sync(self, items: list[tuple[str, bytes]]) -> None:
        for name, data in items:
            self._put_sync(name, data)

    def _put_sync(self, name: str, data: bytes) -> None:
        path = self._path(name)
        if path.exists():
            # a blob written again is in use again: refresh its age so a garbage
            # collection running before its new reference lands does not take it
            with contextlib.suppress(OSError):
                os.utime(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    async def exists(self, name: str) -> bool:
        return self._path(name).exists()

    async def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    async def list(self) -> AsyncIterator[tuple[str, float]]:
        """Every blob under root/ab/cd/<digest>.zst with its mtime; temp files of puts
        in progress (.tmp-*) and anything else that is not a blob are skipped."""
        for top in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not (top.is_dir() and len(top.name) == 2):
                continue
            for sub in sorted(top.iterdir()):
                if not (sub.is_dir() and len(sub.name) == 2):
                    continue
                for path in sorted(sub.iterdir()):
                    name = path.name
                    if name.startswith(".tmp-") or not name.endswith(".zst"):
                        continue
                    digest = name[: -len(".zst")]
                    if not is_digest(digest) or digest[:2] != top.name or digest[2:4] != sub.name:
                        continue
                    try:
                        mtime = path.stat().st_mtime
                    except FileNotFoundError:  # deleted while we walked
                        continue
                    yield digest, mtime
            await asyncio.sleep(0)  # let other tasks run on a large store


# nats-py's object get reads the chunks through an ordered consumer with no bound: one
# that dies with a nats restart mid-read would wait forever. Generous (a large model at
# a few MB/s), but an end; a timeout is a TimeoutError, which callers retry or fail on.
OBJECT_GET_TIMEOUT_S = 300.0
# How long an object-store call keeps retrying through a bus outage before giving up.
OUTAGE_S = 60.0
T = TypeVar("T")


async def _through_outage(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, retried while the bus is briefly out (a server restarting, a cluster
    electing a new leader for the bucket's stream) for up to OUTAGE_S: a timeout there is
    an outage, not a store that refuses the blob (which would fail the workflow)."""
    from flowmesh.topics.bus.nats import is_transient

    deadline = time.monotonic() + OUTAGE_S
    delay = 0.1
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class NatsObjectBackend:
    """Blobs as objects in a JetStream object store bucket (no shared disk needed)."""

    def __init__(self, store: Any) -> None:  # nats.js.object_store.ObjectStore
        self.store = store

    async def put(self, name: str, data: bytes) -> None:
        async def put_once() -> None:
            # content-addressed: putting the same blob again after a lost reply is harmless
            if not await self._exists(name):
                await self.store.put(check_name(name), data)

        await _through_outage(put_once)

    async def get(self, name: str) -> bytes | None:
        from nats.js.errors import ObjectNotFoundError

        async def get_once() -> Any:
            return await asyncio.wait_for(self.store.get(check_name(name)), OBJECT_GET_TIMEOUT_S)

        try:
            res = await _through_outage(get_once)
        except ObjectNotFoundError:
            return None
        data: bytes = res.data or b""
        return data

    async def exists(self, name: str) -> bool:
        return await _through_outage(lambda: self._exists(name))

    async def _exists(self, name: str) -> bool:
        from nats.js.errors import ObjectNotFoundError

        try:
            info = await self.store.get_info(check_name(name))
        except ObjectNotFoundError:
            return False
        return not getattr(info, "deleted", False)

    async def delete(self, name: str) -> None:
        from nats.js.errors import ObjectNotFoundError

        with contextlib.suppress(ObjectNotFoundError):
            await self.store.delete(check_name(name))

    async def list(self) -> AsyncIterator[tuple[str, float]]:
        """Every live object whose name is a digest, with the time it was put."""
        from nats.js.errors import NotFoundError

        try:
            infos = await self.store.list(ignore_deletes=True)
        except NotFoundError:  # nats-py raises this for a store with no (live) objects
            return
        for info in infos:
            name = getattr(info, "name", None)
            if getattr(info, "deleted", False) or not isinstance(name, str):
                continue
            if is_digest(name):
                yield name, _parse_mtime(getattr(info, "mtime", None))


# what JetStream accepts as an object store name
# Blobs larger than this are hashed and (de)compressed in a thread, off the event loop.
OFF_LOOP_BYTES = 256 * 1024
PUT_CHUNK = 250  # records hashed between yields to the event loop in put_records

_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FRACTION_RE = re.compile(r"(\.\d{6})\d+")


def _parse_mtime(value: object) -> float:
    """An object's mtime (RFC 3339, possibly with nanoseconds and a Z) as a unix time.
    One that cannot be read counts as now: a blob of unknown age is never old enough
    for garbage collection to take it."""
    if isinstance(value, str) and value:
        text = _FRACTION_RE.sub(r"\1", value.strip())
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            pass
    return time.time()


class CAS:
    def __init__(self, backend: BlobBackend, max_blob_bytes: int = 1 << 30) -> None:
        self.backend = backend
        self.max_blob_bytes = max_blob_bytes
        # used on the event loop only; threads make their own (zstd contexts are not
        # thread-safe)
        self._cctx = zstandard.ZstdCompressor(level=3)
        self._dctx = zstandard.ZstdDecompressor()

    @staticmethod
    def _check(digest: str) -> str:
        return check_name(digest)

    async def put(self, data: bytes, digest: str | None = None) -> str:
        """Store `data`; its digest is returned. A caller that names the digest it expects
        (a copy from another store, an upload) gets DigestMismatch instead of a blob
        stored under a name its content does not have."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CASError(f"a blob is bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > self.max_blob_bytes:
            raise CASError(f"blob of {len(data)} bytes exceeds the {self.max_blob_bytes} limit")
        if len(data) > OFF_LOOP_BYTES:
            # hashing and compressing a large blob would hold every other task of the
            # caller's event loop (the engine's serves all tenants)
            actual, packed = await asyncio.to_thread(self._pack, data)
        else:
            actual, packed = sha256_hex(data), self._cctx.compress(data)
        if digest is not None and check_name(digest) != actual:
            raise DigestMismatch(f"content has digest {actual}, not the claimed {digest}")
        try:
            await self.backend.put(actual, packed)
        except OSError as exc:
            # a full disk or a read-only store: every caller handles CASError (the
            # planner fails the workflow with this reason instead of hanging on it)
            raise CASError(f"cannot store blob {actual[:12]}: {exc}") from exc
        return actual

    def _pack(self, data: bytes) -> tuple[str, bytes]:
        # a compressor per call: the shared one is not safe across threads
        return sha256_hex(data), zstandard.ZstdCompressor(level=3).compress(data)

    async def put_records(self, records: builtins.list[Record]) -> builtins.list[str]:
        """Store many records; their digests in order. Encoding, hashing and compressing
        go a chunk at a time between other tasks, and file writes in a thread, so a dataset
        of 60k records does not hold the event loop for seconds."""
        out: builtins.list[str] = []
        for start in range(0, len(records), PUT_CHUNK):
            chunk = records[start : start + PUT_CHUNK]
            # on the loop, a chunk at a time with a yield between: in a thread this
            # Python-level work would hold the GIL and the loop would queue behind it
            packed = [(sha256_hex(b := canonical(r)), self._cctx.compress(b)) for r in chunk]
            await asyncio.sleep(0)
            try:
                if isinstance(self.backend, FileBackend):
                    await self.backend.put_many(packed)
                else:
                    await asyncio.gather(*(self.backend.put(d, b) for d, b in packed))
            except OSError as exc:
                raise CASError(f"cannot store records: {exc}") from exc
            out.extend(d for d, _ in packed)
        return out

    async def get(self, digest: str) -> bytes:
        try:
            raw = await self.backend.get(self._check(digest))
        except OSError as exc:
            raise CASError(f"cannot read blob {digest[:12]}: {exc}") from exc
        if raw is None:
            raise BlobNotFound(digest)
        if len(raw) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(self._unpack, digest, raw, zstandard.ZstdDecompressor())
        return self._unpack(digest, raw, self._dctx)

    def _unpack(self, digest: str, raw: bytes, dctx: zstandard.ZstdDecompressor) -> bytes:
        try:
            data = dctx.decompress(raw, max_output_size=self.max_blob_bytes)
        except zstandard.ZstdError as exc:
            raise CorruptBlob(f"{digest}: cannot decompress: {exc}") from exc
        if sha256_hex(data) != digest:
            raise CorruptBlob(f"{digest}: content does not match its digest")
        return data

    async def exists(self, digest: str) -> bool:
        return await self.backend.exists(self._check(digest))

    async def delete(self, digest: str) -> None:
        await self.backend.delete(self._check(digest))

    async def list(self) -> AsyncIterator[tuple[str, float]]:
        """(digest, modification time as a unix timestamp) of every stored blob."""
        async for item in self.backend.list():
            yield item

    # --- typed layouts ----------------------------------------------------------------

    async def put_record(self, record: Record) -> str:
        return await self.put(canonical(record))

    async def get_record(self, digest: str) -> Record:
        value = _json(digest, await self.get(digest))
        if not isinstance(value, dict):
            raise CorruptBlob(f"{digest} is not a record")
        return value

    async def put_manifest(self, digests: builtins.list[str]) -> str:
        return await self.put(canonical(digests))

    async def get_manifest(self, digest: str) -> builtins.list[str]:
        value = _json(digest, await self.get(digest))
        if not isinstance(value, list) or not all(
            isinstance(d, str) and is_digest(d) for d in value
        ):
            raise CorruptBlob(f"{digest} is not a manifest")
        return value

    async def get_records(self, digests: builtins.list[str]) -> builtins.list[Record]:
        """The records, in order. A chunk at a time, yielding between chunks: a group over
        60k records read them all in one go and its worker missed its heartbeats (it was
        reclaimed, and its next worker too)."""
        out: builtins.list[Record] = []
        for start in range(0, len(digests), PUT_CHUNK):
            chunk = digests[start : start + PUT_CHUNK]
            out.extend(await asyncio.gather(*(self.get_record(d) for d in chunk)))
            await asyncio.sleep(0)
        return out

    async def put_table(self, records: builtins.list[Record]) -> str:
        # Arrow conversion of a large dataset takes seconds: off the event loop
        return await self.put(await asyncio.to_thread(records_to_arrow, records))

    async def get_table(self, digest: str) -> builtins.list[Record]:
        return await asyncio.to_thread(arrow_to_records, await self.get(digest))


def _json(digest: str, data: bytes) -> Any:
    """A blob's JSON: a blob that is intact but is not JSON (a table's digest given where
    a record's belongs) is a CASError like any other unusable blob, so callers that
    handle CASError never die of it."""
    import msgspec

    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CorruptBlob(f"{digest} is not JSON: {exc}") from exc


def records_to_arrow(records: list[Record]) -> bytes:
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CASError(f"records do not form one table (mixed types in a field?): {exc}") from exc
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    del table
    # Arrow's allocator keeps what it freed for reuse: in a long-lived engine that
    # converts a tenant's large dataset now and then, that is memory never given back
    pa.default_memory_pool().release_unused()
    return sink.getvalue()


def arrow_to_records(data: bytes) -> list[Record]:
    try:
        table = ipc.open_stream(pa.py_buffer(data)).read_all()
        rows: list[Record] = table.to_pylist()
        del table
        pa.default_memory_pool().release_unused()  # see records_to_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        # odd bytes give ArrowInvalid, ArrowTypeError, or a bare OSError
        # (b"\x00\x00\x00\x80": "negative continuation token")
        raise CorruptBlob(f"not an Arrow IPC stream: {exc}") from exc
    return rows


async def open_cas(url: str, js: Any | None = None) -> CAS:
    """`file:///path` or a bare path -> files; `nats:` -> the JetStream object store."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return CAS(FileBackend(parsed.path if parsed.scheme else url))
    if parsed.scheme == "nats":
        if js is None:
            raise CASError("the nats CAS backend needs a JetStream connection")
        from flowmesh.topics.streams import OBJ_CAS

        bucket = parsed.netloc or parsed.path.strip("/") or OBJ_CAS
        if not _BUCKET_RE.fullmatch(bucket):
            raise CASError(f"object store bucket {bucket!r} must match {_BUCKET_RE.pattern}")
        return CAS(NatsObjectBackend(await js.object_store(bucket)))
    if parsed.scheme == "s3":
        # S3 / MinIO / SeaweedFS; credentials from the environment (topics/store/s3.py)
        from flowmesh.topics.store.s3 import S3Backend

        return CAS(await S3Backend.open(url))
    raise CASError(f"unknown CAS url {url!r} (use file:///path, nats: or s3://bucket/prefix)")
