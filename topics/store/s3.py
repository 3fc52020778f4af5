"""S3 CAS backend: blobs as objects in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS,
Ceph RGW, R2...), through the `minio` client.

URL: `s3://bucket/prefix?endpoint=host:port&secure=0&region=us-east-1`. Without
`endpoint` it is AWS S3 itself. Credentials come from the environment, never the URL (a
URL ends up in logs and process lists): FLOWMESH_S3_ACCESS_KEY / FLOWMESH_S3_SECRET_KEY,
else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN).

Objects are laid out like the file backend: `<prefix>/ab/cd/<digest>.zst`. The client
is synchronous (urllib3), so every call runs in a thread; a pool of connections sized for
the CAS's concurrent reads (`get_records` gathers many) keeps them from queueing.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

import structlog

from flowmesh.topics.codec import is_digest
from flowmesh.topics.store.cas import CASError

log = structlog.get_logger("flowmesh.cas.s3")

# S3 error codes that mean "no such object" (get/stat) as opposed to trouble
_MISSING = {"NoSuchKey", "NoSuchObject", "ResourceNotFound", "NotFound"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "some/prefix/" (always ends in "/")
    endpoint: str  # host[:port]
    secure: bool
    region: str | None
    create_bucket: bool


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket[/prefix][?endpoint=host:port&secure=0|1&region=R&create=0|1]`."""
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise CASError(f"not an s3 URL: {url!r}")
    if parsed.username or parsed.password:
        raise CASError(
            "put S3 credentials in FLOWMESH_S3_ACCESS_KEY / FLOWMESH_S3_SECRET_KEY "
            "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), not in the CAS URL"
        )
    bucket = parsed.hostname or ""
    if not bucket:
        raise CASError(f"no bucket in {url!r} (use s3://bucket/prefix?endpoint=host:port)")
    query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
    unknown = set(query) - {"endpoint", "secure", "region", "create"}
    if unknown:
        raise CASError(f"unknown s3 URL parameter(s) {sorted(unknown)} in {url!r}")
    prefix = parsed.path.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise CASError(f"bad prefix {prefix!r} in {url!r}")
    return S3Location(
        bucket=bucket,
        prefix=f"{prefix}/" if prefix else "",
        endpoint=query.get("endpoint") or "s3.amazonaws.com",
        secure=_flag(query, "secure", True, url),
        region=query.get("region") or None,
        create_bucket=_flag(query, "create", True, url),
    )


def _flag(query: dict[str, str], name: str, default: bool, url: str) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise CASError(f"s3 URL parameter {name}={value!r} must be 0 or 1 ({url!r})")


def credentials_from_env(env: dict[str, str] | None = None) -> tuple[str, str, str | None]:
    """(access key, secret key, session token) from FLOWMESH_S3_* or AWS_*."""
    env = dict(os.environ) if env is None else env
    access = env.get("FLOWMESH_S3_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID")
    secret = env.get("FLOWMESH_S3_SECRET_KEY") or env.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise CASError(
            "the s3 CAS needs credentials: set FLOWMESH_S3_ACCESS_KEY and "
            "FLOWMESH_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    return access, secret, env.get("AWS_SESSION_TOKEN") or None


class S3Backend:
    """A `BlobBackend` over one bucket (and key prefix) of an S3-compatible store."""

    def __init__(self, client: Any, location: S3Location) -> None:  # client: minio.Minio
        self.client = client
        self.loc = location

    @classmethod
    async def open(cls, url: str, env: dict[str, str] | None = None) -> S3Backend:
        """Connect, check the credentials and the bucket (creating it unless
        `create=0`), so a wrong endpoint or key fails at start, not at the first put."""
        try:
            import urllib3
            from minio import Minio
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise CASError("the s3 CAS needs the minio client: pip install 'flowmesh[s3]'") from exc
        loc = parse_s3_url(url)
        access, secret, token = credentials_from_env(env)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            maxsize=32,
            # connection-level retries only: an S3 error status must reach minio, which
            # turns it into an S3Error with the server's code
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status=0),
        )
        client = Minio(
            loc.endpoint,
            access_key=access,
            secret_key=secret,
            session_token=token,
            secure=loc.secure,
            region=loc.region,
            http_client=http,
        )
        backend = cls(client, loc)
        await backend._ensure_bucket()
        log.info("s3 CAS opened", endpoint=loc.endpoint, bucket=loc.bucket, prefix=loc.prefix)
        return backend

    async def _ensure_bucket(self) -> None:
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            exists = await asyncio.to_thread(self.client.bucket_exists, self.loc.bucket)
            if not exists:
                if not self.loc.create_bucket:
                    raise CASError(f"s3 bucket {self.loc.bucket!r} does not exist")
                await asyncio.to_thread(self.client.make_bucket, self.loc.bucket)
        except S3Error as exc:
            if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another process created it between our check and make
            raise CASError(f"s3 {self.loc.endpoint}/{self.loc.bucket}: {exc.code}: {exc}") from exc
        except (OSError, ValueError, HTTPError) as exc:  # unreachable endpoint, bad bucket
            raise CASError(f"s3 {self.loc.endpoint}/{self.loc.bucket}: {exc}") from exc

    def _key(self, name: str) -> str:
        # only a digest may name an object: no "..", "/" or a second spelling of one
        if not is_digest(name):
            raise CASError(f"not a content digest: {name!r}"[:200])
        return f"{self.loc.prefix}{name[:2]}/{name[2:4]}/{name}.zst"

    async def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        if await self.exists(name):
            # in use again: refresh its age (a server-side copy onto itself, no upload)
            # so a garbage collection running before its new reference lands spares it
            await asyncio.to_thread(self._touch, key)
            return
        await asyncio.to_thread(
            self.client.put_object,
            self.loc.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type="application/zstd",
        )

    def _touch(self, key: str) -> None:
        from minio.commonconfig import REPLACE, CopySource
        from minio.error import S3Error

        try:
            self.client.copy_object(
                self.loc.bucket,
                key,
                CopySource(self.loc.bucket, key),
                metadata={"x-amz-meta-touched": "1"},
                metadata_directive=REPLACE,
            )
        except S3Error as exc:
            # a store that refuses copies onto the object itself only loses the
            # refresh; the blob is there, which is what the put promised
            log.warning("s3 touch failed", key=key, error=exc.code)

    async def get(self, name: str) -> bytes | None:
        key = self._key(name)
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> bytes | None:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.loc.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise CASError(f"s3 get {key}: {exc.code}: {exc}") from exc
        try:
            data: bytes = resp.read()
            return data
        finally:
            resp.close()
            resp.release_conn()

    async def exists(self, name: str) -> bool:
        key = self._key(name)
        return await asyncio.to_thread(self._exists, key)

    def _exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.loc.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return False
            raise CASError(f"s3 stat {key}: {exc.code}: {exc}") from exc
        return True

    async def delete(self, name: str) -> None:
        # S3 deletes are idempotent: a missing key is not an error
        await asyncio.to_thread(self.client.remove_object, self.loc.bucket, self._key(name))

    async def list(self) -> AsyncIterator[tuple[str, float]]:
        """Every object under the prefix laid out as ab/cd/<digest>.zst, with its
        last-modified time; anything else in the bucket is skipped."""
        it = iter(self.client.list_objects(self.loc.bucket, prefix=self.loc.prefix, recursive=True))
        while True:
            # one page fetch (up to 1000 keys) in a thread at a time
            batch = await asyncio.to_thread(_take, it, 1000)
            for obj in batch:
                item = self._parse(obj.object_name or "", obj.last_modified)
                if item is not None:
                    yield item
            if len(batch) < 1000:
                return

    def _parse(self, key: str, modified: datetime | None) -> tuple[str, float] | None:
        rest = key[len(self.loc.prefix) :]
        parts = rest.split("/")
        if len(parts) != 3 or not parts[2].endswith(".zst"):
            return None
        digest = parts[2][: -len(".zst")]
        if not is_digest(digest) or parts[0] != digest[:2] or parts[1] != digest[2:4]:
            return None
        # an object of unknown age counts as new: garbage collection never takes it
        mtime = modified.timestamp() if modified is not None else _now()
        return digest, mtime


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for obj in it:
        out.append(obj)
        if len(out) >= n:
            break
    return out


def _now() -> float:
    import time

    return time.time()
