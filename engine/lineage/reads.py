"""What the bus holds about a workflow's lineage, read without side effects: its status
(KV fm_wf), operator entries (KV fm_ops), requests (KV fm_requests, read by short-lived
consumers filtered on the server) and its submission (stream FM_SUBMIT). engine/cost.py
and the console read through these too: KV fm_requests holds a wave's `ran` requests
as one entry, and only the readers here know how to expand it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nats.js.errors import KeyNotFoundError

from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.messages import (
    RAN_PREFIX,
    OpRequest,
    OpState,
    RanRequests,
    SubmitWorkflow,
    WorkflowSpec,
    WorkflowStatus,
)

SUBMIT_SKEW_S = 300.0  # client/server clock skew tolerated when finding the submission
SUBMIT_SCAN_MAX = 20_000  # submissions read at most while looking for one
SUBMIT_READ_WAIT_S = 1.0  # no submission for this long: the end of the stream


async def workflow_status(bus: Bus, workflow_id: str) -> WorkflowStatus | None:
    if not subjects.is_token(workflow_id):
        return None
    kv = await bus.kv(streams.KV_WF)
    try:
        entry = await kv.get(workflow_id)
    except KeyNotFoundError:
        return None
    return codec.decode(entry.value, WorkflowStatus) if entry.value else None


async def op_state(bus: Bus, key: str) -> OpState | None:
    kv = await bus.kv(streams.KV_OPS)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # deleted or purged: an invalidated cache entry
        return None
    if not entry.value:
        return None
    try:
        return codec.decode(entry.value, OpState)
    except codec.DecodeError:
        return None


def request_records(name: str, value: bytes) -> list[OpRequest]:
    """The requests one KV fm_requests entry holds, by its key `name`: one (a `joined`
    or `reused` one, "<op key>.<workflow id>"), or a wave's `ran` ones (RanRequests,
    "ran-<digest>.<workflow id>"). Every reader of the bucket goes through this.
    Raises codec.DecodeError for a value that is neither."""
    if name.startswith(RAN_PREFIX):
        return codec.decode(value, RanRequests).requests()
    return [codec.decode(value, OpRequest)]


def unique_requests(reqs: Iterable[OpRequest]) -> list[OpRequest]:
    """One request per (operator, workflow), the earliest: a replayed submission may
    record a `ran` again in a wave cut otherwise; the first request is the one that
    counts (as a per-key create once kept it)."""
    first: dict[tuple[str, str], OpRequest] = {}
    for r in reqs:
        had = first.get((r.key, r.workflow_id))
        if had is None or r.at < had.at:
            first[(r.key, r.workflow_id)] = r
    return list(first.values())


def requesters(st: OpState, recorded: Iterable[OpRequest], node: str = "") -> list[OpRequest]:
    """Everyone who asked for one operator, in the order they asked: the workflow whose
    request ran it (its fm_ops entry's `workflow_id`: its `ran` request is recorded per
    wave, not per key, so a lookup by key finds it here; `node` names its node when
    the caller knows it), and those recorded by key. A `ran` recorded for another
    workflow is dropped: that request's run failed and another workflow's re-ran it,
    or the entry was invalidated and created again; this one is what they share."""
    out: dict[str, OpRequest] = {}
    for r in sorted(recorded, key=lambda r: r.at):
        if r.role == "ran" and r.workflow_id != st.workflow_id:
            continue
        out.setdefault(r.workflow_id, r)
    if st.workflow_id not in out:
        out[st.workflow_id] = OpRequest(
            st.key, st.workflow_id, st.tenant, node, "ran", st.created_at
        )
    return sorted(out.values(), key=lambda r: r.at)


def decode_requests(entries: Iterable[tuple[str, bytes]]) -> Iterable[OpRequest]:
    """The OpRequests among KV fm_requests entries (key, value) (RanRequests expanded; a
    record that does not decode is skipped)."""
    for name, data in entries:
        try:
            yield from request_records(name, data)
        except codec.DecodeError:
            continue


async def all_requests(bus: Bus) -> list[OpRequest]:
    """Every request in KV fm_requests, one per (operator, workflow); an entry that does
    not decode is skipped."""
    out: list[OpRequest] = []
    for name, value, _ in await bus.kv_items(streams.KV_REQUESTS):
        try:
            out.extend(request_records(name, value))
        except codec.DecodeError:
            continue
    return unique_requests(out)


async def requests_of_ops(
    bus: Bus,
    keys: list[str],
    states: Mapping[str, OpState | None],
    workflow_id: str | None = None,
    node_of: Mapping[str, str] | None = None,
) -> dict[str, list[OpRequest]]:
    """Every request of these operator keys: those recorded per key (KV fm_requests
    "<key>.<workflow id>", read by consumers filtered on the server) and, from its
    entry in `states`, the workflow that ran each one. `workflow_id` is the caller's
    own workflow (`node_of` names its node of each key): for a key whose entry is gone
    (invalidated), its own `ran` request is read from its wave records instead."""
    recorded: dict[str, list[OpRequest]] = {}
    entries = await bus.kv_select(streams.KV_REQUESTS, [f"{k}.*" for k in keys])
    for req in decode_requests(entries):
        recorded.setdefault(req.key, []).append(req)
    gone = [k for k in keys if states.get(k) is None]
    if gone and workflow_id is not None:
        wanted = set(gone)
        own = await requests_of_workflow(bus, workflow_id)
        for reqs in own.values():
            for r in reqs:
                if r.key in wanted and r.role == "ran":
                    recorded.setdefault(r.key, []).append(r)
    nodes = node_of or {}
    out: dict[str, list[OpRequest]] = {}
    for key in keys:
        st = states.get(key)
        reqs = recorded.get(key, [])
        if st is not None:
            own_node = nodes.get(key, "") if st.workflow_id == workflow_id else ""
            out[key] = requesters(st, reqs, own_node)
        elif reqs:
            out[key] = sorted(unique_requests(reqs), key=lambda r: r.at)
    return out


async def requests_of_workflow(bus: Bus, workflow_id: str) -> dict[str, list[OpRequest]]:
    """This workflow's OpRequests by node, in the order they were made."""
    entries = await bus.kv_select(streams.KV_REQUESTS, [f"*.{workflow_id}"])
    by_node: dict[str, list[OpRequest]] = {}
    for req in unique_requests(decode_requests(entries)):
        by_node.setdefault(req.node, []).append(req)
    for reqs in by_node.values():
        reqs.sort(key=lambda r: r.at)
    return by_node


async def submitted_spec(bus: Bus, workflow_id: str, submitted_at: float) -> WorkflowSpec | None:
    """The spec as submitted (it names each node's inputs), read from the submit stream
    (on either bus) from just before the submission time; None once it has aged out."""
    horizon = submitted_at + SUBMIT_SKEW_S
    try:
        replay = await bus.transport.replay(subjects.SUBMIT, since=submitted_at - SUBMIT_SKEW_S)
    except Exception:  # the edges can still be inferred from the digests
        return None
    read = 0
    try:
        while read < SUBMIT_SCAN_MAX:
            try:
                records = await replay.fetch(256, timeout=SUBMIT_READ_WAIT_S)
            except TimeoutError:
                return None  # read to the end of the stream
            for r in records:
                read += 1
                try:
                    sub = codec.decode(r.data, SubmitWorkflow)
                except codec.DecodeError:
                    continue
                if sub.workflow_id == workflow_id:
                    return sub.spec
                if r.at > horizon:
                    return None
    except Exception:
        return None
    finally:
        await replay.unsubscribe()
    return None
