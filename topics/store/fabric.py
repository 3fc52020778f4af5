"""The fabric's own record of where its data lives, so that clients agree with it.

The engine writes a FabricRecord at start (KV fm_fabric, key "engine"): the CAS URL it and
its workers use, absolute. A client that was not told a CAS uses that one, wherever it runs
from; a client that was told another is stopped with an error naming both, instead of
uploading a dataset where no worker will look (or reading a result from an empty store).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import msgspec
from nats.js.errors import KeyNotFoundError

from flowmesh.topics import codec, streams
from flowmesh.topics.bus.nats import Bus
from flowmesh.topics.errors import DataDirMismatch

FABRIC_KEY = "engine"


class FabricRecord(msgspec.Struct, frozen=True):
    cas: str  # the CAS URL the engine opened (file: URLs absolute)
    host: str  # where a file: CAS is (it is only shared on that machine)
    started_at: float


async def record_fabric(bus: Bus, cas_url: str) -> None:
    kv = await bus.kv(streams.KV_FABRIC)
    record = FabricRecord(cas=canonical(cas_url), host=socket.gethostname(), started_at=time.time())
    await kv.put(FABRIC_KEY, codec.encode(record))


async def read_fabric(bus: Bus, wait_s: float = 0.0) -> FabricRecord | None:
    """The engine's record, waiting up to `wait_s` seconds for one to be written; None
    when there is none (no engine started on this server yet)."""
    kv = await bus.kv(streams.KV_FABRIC)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            entry = await kv.get(FABRIC_KEY)
        except KeyNotFoundError:
            entry = None
        if entry is not None and entry.value:
            try:
                return codec.decode(entry.value, FabricRecord)
            except codec.DecodeError:
                return None
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.1)


def canonical(cas_url: str) -> str:
    """file: URLs with an absolute, resolved path; others as given."""
    parsed = urlparse(cas_url)
    if parsed.scheme == "file":
        return f"file://{Path(parsed.netloc + parsed.path).expanduser().resolve()}"
    return cas_url


def agree(record: FabricRecord | None, mine: str | None, fallback: str, nats_url: str) -> str:
    """The CAS this client must use: the fabric's when it was not given one (`mine` None),
    `mine` when it matches the fabric's (or no fabric recorded one), else DataDirMismatch."""
    if record is None:
        return mine or fallback
    if mine is None:
        if urlparse(record.cas).scheme == "file" and record.host != socket.gethostname():
            raise DataDirMismatch(
                f"the fabric at {nats_url} keeps its data in {record.cas} on host "
                f"{record.host}, which this machine ({socket.gethostname()}) cannot read; "
                "give this client a shared CAS (--cas nats: or s3://...) that the fabric "
                "uses too"
            )
        return record.cas
    if canonical(mine) != record.cas:
        raise DataDirMismatch(
            f"this command's CAS is {canonical(mine)}, but the fabric at {nats_url} uses "
            f"{record.cas}: datasets uploaded here would not reach its workers, and its "
            "results are not here. Leave out --data-dir/--cas (and FLOWMESH_DATA/"
            "FLOWMESH_CAS) to use the fabric's, or set them to the fabric's."
        )
    return mine
