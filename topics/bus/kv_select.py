"""The entries of a KV bucket whose keys match subject-style patterns ("<op key>.*",
"*.<workflow id>": tokens split on dots, `*` one token, `>` the rest), on either store.

On NATS a short-lived consumer filtered on the server reads only the matching entries
(the bucket's stream keeps one message per key). On Kafka-only the bucket's changelog is
read to its end and filtered here: a compacted topic has no server-side filter, so such
a read costs the whole bucket, not the match (what lineage and a tenant's cost read from
fm_requests; README "Running on Kafka" says so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

FETCH_WAIT_S = 2.0
INACTIVE_S = 30.0  # a consumer left behind by a crash removes itself
FILTERS_PER_CONSUMER = 200  # a consumer's filter subjects; more patterns: more consumers
CONSUMERS_AT_ONCE = 4


def key_matches(key: str, pattern: str) -> bool:
    """Whether a KV key matches a NATS subject pattern, as the server would decide."""
    tokens, wanted = key.split("."), pattern.split(".")
    for i, w in enumerate(wanted):
        if w == ">":
            return len(tokens) > i
        if i >= len(tokens) or (w != "*" and w != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def select_items(
    items: Sequence[tuple[str, bytes, int]], patterns: Sequence[str]
) -> list[tuple[str, bytes]]:
    """(key, value) of the live entries among `items` whose key matches a pattern."""
    return [
        (key, value)
        for key, value, _ in items
        if value and any(key_matches(key, p) for p in patterns)
    ]


async def js_select(
    js: JetStreamContext, bucket: str, patterns: Sequence[str]
) -> list[tuple[str, bytes]]:
    """(key, value) of the bucket's live entries matching `patterns`, read by consumers
    filtered on the server (FILTERS_PER_CONSUMER patterns each, CONSUMERS_AT_ONCE at a
    time), each deleted afterwards."""
    chunks = [
        patterns[i : i + FILTERS_PER_CONSUMER]
        for i in range(0, len(patterns), FILTERS_PER_CONSUMER)
    ]
    sem = asyncio.Semaphore(CONSUMERS_AT_ONCE)

    async def one(chunk: Sequence[str]) -> list[tuple[str, bytes]]:
        async with sem:
            return await _consume(js, bucket, chunk)

    return [entry for got in await asyncio.gather(*(one(c) for c in chunks)) for entry in got]


async def _consume(
    js: JetStreamContext, bucket: str, patterns: Sequence[str]
) -> list[tuple[str, bytes]]:
    """One consumer's read: the matching entries, once."""
    stream = f"KV_{bucket}"
    prefix = f"$KV.{bucket}."
    filters = [prefix + p for p in patterns]
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=INACTIVE_S,
        mem_storage=True,
        filter_subjects=filters if len(filters) > 1 else None,
        filter_subject=filters[0] if len(filters) == 1 else None,
    )
    psub = await js.pull_subscribe(filters[0], stream=stream, config=config)
    out: list[tuple[str, bytes]] = []
    name = None
    try:
        info = await psub.consumer_info()
        name = info.name
        pending = info.num_pending or 0
        while pending > 0:
            try:
                msgs = await psub.fetch(min(pending, 256), timeout=FETCH_WAIT_S)
            except TimeoutError:
                break
            for msg in msgs:
                op = (msg.headers or {}).get("KV-Operation")
                if op not in ("DEL", "PURGE") and msg.data:
                    out.append((msg.subject.removeprefix(prefix), msg.data))
            pending = msgs[-1].metadata.num_pending if msgs else 0
    finally:
        try:
            await psub.unsubscribe()
            if name:
                await js.delete_consumer(stream, name)
        except Exception:  # it expires by itself (INACTIVE_S)
            pass
    return out
