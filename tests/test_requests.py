"""Reading KV fm_requests: a wave's `ran` requests are one entry, `joined` and `reused`
one per key, and the workflow that ran an operator is also in its fm_ops entry. The
readers (lineage, cost, the console) must see the same requests as one entry per
operator and workflow did."""

from __future__ import annotations

import pytest

from flowmesh.engine.cost import attribute
from flowmesh.engine.lineage.reads import request_records, requesters, unique_requests
from flowmesh.topics import codec
from flowmesh.topics.messages import RAN_PREFIX, OpRequest, OpSpec, OpState, RanRequests

SPEC = OpSpec(
    kind="map", executor="x", version="1", fanout="record", params={}, model=None, inputs=[]
)


def state(key: str, wf: str, tenant: str, cost: float = 1.0) -> OpState:
    return OpState(
        key=key, state="done", spec=SPEC, workflow_id=wf, tenant=tenant, created_at=1.0,
        cost_usd=cost,
    )  # fmt: skip


def test_a_wave_entry_reads_as_one_ran_request_per_operator() -> None:
    entry = RanRequests("wf-a", "acme", "shout", 5.0, ["k1", "k2"])
    got = request_records(f"{RAN_PREFIX}abc.wf-a", codec.encode(entry))
    assert got == [
        OpRequest("k1", "wf-a", "acme", "shout", "ran", 5.0),
        OpRequest("k2", "wf-a", "acme", "shout", "ran", 5.0),
    ]
    one = OpRequest("k1", "wf-b", "globex", "shout", "reused", 6.0)
    assert request_records("k1.wf-b", codec.encode(one)) == [one]
    with pytest.raises(codec.DecodeError):
        request_records(f"{RAN_PREFIX}abc.wf-a", codec.encode(one))


def test_a_replayed_ran_counts_once_and_stays_ran() -> None:
    first = OpRequest("k1", "wf-a", "acme", "shout", "ran", 5.0)
    again = OpRequest("k1", "wf-a", "acme", "shout", "ran", 9.0)
    assert unique_requests([again, first]) == [first]


def test_the_workflow_that_ran_it_comes_from_the_entry() -> None:
    st = state("k1", "wf-a", "acme")
    joined = OpRequest("k1", "wf-b", "globex", "n", "joined", 6.0)
    got = requesters(st, [joined], node="shout")
    assert [(r.workflow_id, r.tenant, r.role, r.node) for r in got] == [
        ("wf-a", "acme", "ran", "shout"),
        ("wf-b", "globex", "joined", "n"),
    ]
    # a ran of another workflow: its run failed, and wf-a's request ran it again
    stale = OpRequest("k1", "wf-c", "initech", "n", "ran", 0.5)
    assert {r.workflow_id for r in requesters(st, [stale, joined])} == {"wf-a", "wf-b"}


def test_cost_splits_among_the_runner_and_the_recorded_others() -> None:
    states = [state("k1", "wf-a", "acme", 3.0), state("k2", "wf-a", "acme", 1.0)]
    requests = [OpRequest("k1", "wf-b", "globex", "n", "reused", 6.0)]
    report = attribute(states, requests, {})
    assert report.workflows["wf-a"].paid_usd == pytest.approx(1.5 + 1.0)
    assert report.workflows["wf-b"].paid_usd == pytest.approx(1.5)
    assert report.workflows["wf-a"].ran == 2 and report.workflows["wf-b"].ran == 0
    assert report.total_usd == pytest.approx(4.0)
