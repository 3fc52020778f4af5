"""The key-value seam: what FlowMesh asks of a KV bucket, whichever bus holds it.

Operator state (the dedup claim and the commit-once compare-and-set), workflow status,
worker heartbeats, request records, quotas and the catalog are KV entries. Two
implementations:
- NATS JetStream KV (the default): nats-py's `KeyValue` satisfies `KV` as it stands, so
  a NATS bucket is handed out unwrapped (no extra call per read or write).
- Kafka (topics/bus/kafka_kv.py): a compacted changelog topic per bucket whose
  partitions one owner applies writes to in order.

Only the subset the code uses is here: get (the entry with its revision), create (fails
if the key exists), update (fails unless the key's revision is `last`), put, delete
(with an optional expected revision), and watchers (the latest value of every matching
key, then `None`, then every change). A revision is a number that grows with every write
of a key; it identifies one write of it and is what a compare-and-set names.

The errors are nats-py's classes on both buses, so every caller's `except` is the same:
a missing (or deleted) key raises `KeyNotFound`, a failed revision check `WrongRevision`
(a JetStream `APIError` whose err_code is one of `WRONG_LAST_SEQUENCE`).
"""

from __future__ import annotations

from typing import Protocol

import nats.js.errors

KeyNotFound = nats.js.errors.KeyNotFoundError
WrongRevision = nats.js.errors.KeyWrongLastSequenceError
WRONG_LAST_SEQUENCE_CODE = 10071  # JetStream's err_code for a failed revision check


def wrong_revision(description: str) -> nats.js.errors.KeyWrongLastSequenceError:
    """A failed revision check as NATS reports one (err_code set, which nats-py's own
    KeyWrongLastSequenceError leaves out), for callers that test the code."""
    exc = WrongRevision(description=description)
    exc.err_code = WRONG_LAST_SEQUENCE_CODE
    exc.code = 400
    return exc


class Entry(Protocol):
    """One value of a key. `operation` is None for a value, "DEL" or "PURGE" for a
    deletion seen by a watcher; `delta` counts the watcher's initial values still to
    come (0 on the last one)."""

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def revision(self) -> int | None: ...

    @property
    def delta(self) -> int | None: ...

    @property
    def operation(self) -> str | None: ...


class Watcher(Protocol):
    async def updates(self, timeout: float = 5.0) -> Entry | None:
        """The next entry; None once, after the initial values; raises TimeoutError
        when nothing came within `timeout`."""
        ...

    async def stop(self) -> None: ...


class KV(Protocol):
    """One bucket."""

    async def get(self, key: str) -> Entry:
        """The key's current entry; raises KeyNotFound if it has none."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Store `value` only if the key has no value; its revision, or WrongRevision."""
        ...

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        """Store `value` only if the key's revision is `last`; its revision, or
        WrongRevision."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Store `value` whatever was there; its revision."""
        ...

    async def delete(self, key: str, last: int | None = None) -> bool:
        """Remove the key (only if its revision is `last`, when given: else
        WrongRevision)."""
        ...

    async def watch(self, keys: str) -> Watcher:
        """Changes of one key."""
        ...

    async def watchall(self) -> Watcher:
        """Changes of every key."""
        ...
