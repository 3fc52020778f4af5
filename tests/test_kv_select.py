"""Selecting KV entries by subject-style key patterns (topics/bus/kv_select.py): on a
Kafka-only bus the changelog is filtered by key_matches, which must pick exactly what a
nats-server's consumer filter picks from the same entries."""

from __future__ import annotations

import nats

from flowmesh.topics.bus.kv_select import js_select, select_items

KEYS = ["op1.wf-a", "op1.wf-b", "op2.wf-a", "ran-d1.wf-a", "op1", "op1.wf-a.x", "op10.wf-a"]
PATTERNS = [
    ["op1.*"],
    ["*.wf-a"],
    ["op1.>"],
    ["op1", "op2.*"],
    ["*.wf-b", "ran-d1.*"],
    ["*"],
    [">"],
    ["op9.*"],
]


async def test_the_filter_on_the_changelog_picks_what_the_server_picks(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="select_test")
        for i, key in enumerate(KEYS):
            await kv.put(key, f"v{i}".encode())
        await kv.put("gone.wf-a", b"x")
        await kv.delete("gone.wf-a")  # a delete marker: no entry on either side
        items = [(key, f"v{i}".encode(), i + 1) for i, key in enumerate(KEYS)]
        items.append(("gone.wf-a", b"", 0))  # the changelog's tombstone, read as no value
        for patterns in PATTERNS:
            on_server = sorted(await js_select(js, "select_test", patterns))
            here = sorted(select_items(items, patterns))
            assert here == on_server, patterns
    finally:
        await nc.close()
