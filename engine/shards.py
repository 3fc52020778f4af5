"""Planner shards: which planner process owns a workflow.

A workflow belongs to exactly one of N planner shards, by a stable hash of its id (the
same in every process and every Python run, unlike `hash()`). Shards share nothing in
memory: dedup stays exact across them because the claim on an operator key is the
operator KV's create-if-absent, on the bus. Each shard reads the whole completion stream
through a durable consumer of its own and ignores the keys none of its workflows wait on.
"""

from __future__ import annotations

import hashlib

from flowmesh.topics import streams


def check_shard(shard: int, shards: int) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in 0..{shards - 1}, got {shard}")


def shard_of(workflow_id: str, shards: int) -> int:
    """The shard (0..shards-1) that plans `workflow_id`."""
    if shards <= 1:
        return 0
    digest = hashlib.blake2b(workflow_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def done_consumer_name(shard: int, shards: int) -> str:
    """The durable completion consumer of a shard. One shard keeps the historical name
    (an all-in-one engine resumes where it was); N shards get names that include N, so
    re-sharding starts fresh consumers instead of inheriting another layout's position."""
    check_shard(shard, shards)
    if shards == 1:
        return streams.PLANNER_DONE
    return f"{streams.PLANNER_DONE}-{shard}-of-{shards}"
