"""Making streams on a cluster that cannot place their replicas for a moment: a clean CI
run's 3-server cluster answered "no suitable peers for placement, peer offline" (err_code
10005) to a KV bucket's create just after it had placed a probe R3 stream, and the
component's start failed. The answers below are the exceptions nats-py raises for the
server's error replies (APIError.from_error), fed to streams._placed in turn."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest
from nats.js.errors import APIError

from flowmesh.topics import streams


def server_error(code: int, err_code: int, description: str) -> APIError:
    try:
        APIError.from_error({"code": code, "err_code": err_code, "description": description})
    except APIError as exc:
        return exc
    raise AssertionError("from_error raises")


NO_PEERS = server_error(400, 10005, "no suitable peers for placement, peer offline")


def answers(*outcomes: BaseException | str) -> tuple[list[int], Any]:
    calls: list[int] = []

    async def create() -> str:
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return calls, create


async def test_a_create_waits_out_a_peer_counted_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams.asyncio, "sleep", _no_sleep)
    calls, create = answers(NO_PEERS, nats.errors.TimeoutError(), NO_PEERS, "made")
    assert await streams._placed(create, "fm_wf") == "made"
    assert len(calls) == 4


async def test_other_refusals_are_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams.asyncio, "sleep", _no_sleep)
    bad = server_error(400, 10058, "stream name already in use with a different configuration")
    calls, create = answers(bad, "made")
    with pytest.raises(APIError) as info:
        await streams._placed(create, "fm_wf")
    assert info.value.err_code == 10058 and len(calls) == 1


async def test_the_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams.asyncio, "sleep", _no_sleep)
    monkeypatch.setattr(streams, "PLACEMENT_WAIT_S", 0.0)
    calls, create = answers(NO_PEERS, NO_PEERS, "made")
    with pytest.raises(APIError):
        await streams._placed(create, "fm_wf")
    assert len(calls) == 1


async def _no_sleep(_: float) -> None:
    return None
