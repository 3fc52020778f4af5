"""Invalidating cache entries: compare-and-delete on the revision read, pending ones left
alone."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from nats.js.errors import APIError

from flowmesh.engine.cache.entries import CacheError, Selector, op_entries
from flowmesh.topics import Bus, streams
from flowmesh.topics.bus.kv import KV
from flowmesh.topics.bus.nats import WRONG_LAST_SEQUENCE


class InvalidateResult(list[str]):
    """The operator keys invalidated (it is that list), with what was left alone:
    `skipped_pending` (in flight: a worker will commit them) and `changed` (the entry
    changed between reading and deleting it; nothing was deleted)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        super().__init__(keys)
        self.skipped_pending: list[str] = []
        self.changed: list[str] = []


async def invalidate(
    bus: Bus,
    *,
    key: str | None = None,
    kind: str | None = None,
    executor: str | None = None,
    version: str | None = None,
    state: Literal["done", "failed"] | None = None,
    all: bool = False,
) -> InvalidateResult:
    """Delete the matching fm_ops entries, so the next request for that work runs it
    again. A call with no selector is refused unless `all=True`. Entries still pending
    are skipped (listed in `.skipped_pending`). Blobs stay: workflow results already
    recorded stay readable until `gc` finds nothing referring to them."""
    sel = Selector(key, kind, executor, version, state)
    if sel.empty() and not all:
        raise CacheError("refusing to invalidate every cache entry without all=True")
    if state == "pending":  # type: ignore[comparison-overlap]
        raise CacheError("pending entries are in flight and cannot be invalidated")
    kv = await bus.kv(streams.KV_OPS)
    result = InvalidateResult()
    for op, revision in await op_entries(bus, sel):
        if op.state == "pending":
            result.skipped_pending.append(op.key)
            continue
        if await delete_if_unchanged(kv, op.key, revision):
            result.append(op.key)
        else:
            result.changed.append(op.key)
    return result


async def delete_if_unchanged(kv: KV, key: str, revision: int) -> bool:
    try:
        await kv.delete(key, last=revision)
    except APIError as exc:
        if getattr(exc, "err_code", None) in WRONG_LAST_SEQUENCE:
            return False
        raise
    return True
