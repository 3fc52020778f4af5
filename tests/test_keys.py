"""Operator keys: same content -> same key; any field that changes the output -> new key."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from flowmesh.engine.keys import OpKeyer, batch_key, op_key, scope_salt
from flowmesh.topics.messages import OpSpec

BASE = OpSpec(
    kind="generate",
    executor="generate",
    version="1+abc",
    fanout="record",
    params={"max_new_tokens": 8, "seed": 0, "temperature": 0.7},
    model="m" * 64,
    inputs=["a" * 64],
)


def test_same_content_same_key() -> None:
    again = OpSpec(**msgspec.structs.asdict(BASE))
    assert op_key(again) == op_key(BASE)
    # param order is not content
    reordered = msgspec.structs.replace(
        BASE, params={"temperature": 0.7, "seed": 0, "max_new_tokens": 8}
    )
    assert op_key(reordered) == op_key(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "map"},
        {"executor": "generate2"},
        {"version": "2+abc"},
        {"fanout": "all"},
        {"params": {"max_new_tokens": 8, "seed": 1, "temperature": 0.7}},  # seed is content
        {"params": {"max_new_tokens": 9, "seed": 0, "temperature": 0.7}},
        {"model": "n" * 64},
        {"model": None},
        {"inputs": ["b" * 64]},
        {"inputs": ["a" * 64, "b" * 64]},
    ],
)
def test_any_changed_field_changes_the_key(change: dict) -> None:
    assert op_key(msgspec.structs.replace(BASE, **change)) != op_key(BASE)


def test_scope_salts_separate_keys() -> None:
    g = op_key(BASE, scope_salt("global", "t1", "wf1"))
    t1 = op_key(BASE, scope_salt("tenant", "t1", "wf1"))
    t2 = op_key(BASE, scope_salt("tenant", "t2", "wf2"))
    w1 = op_key(BASE, scope_salt("workflow", "t1", "wf1"))
    assert len({g, t1, t2, w1}) == 4
    assert op_key(BASE, scope_salt("global", "t1", "wf1")) == op_key(
        BASE, scope_salt("global", "t2", "wf9")
    )
    assert op_key(BASE, scope_salt("tenant", "t1", "wf1")) == op_key(
        BASE, scope_salt("tenant", "t1", "wf9")
    )


def test_batch_key_ignores_inputs_only() -> None:
    other_input = msgspec.structs.replace(BASE, inputs=["c" * 64])
    assert batch_key(other_input) == batch_key(BASE)
    assert batch_key(msgspec.structs.replace(BASE, model="n" * 64)) != batch_key(BASE)
    assert batch_key(msgspec.structs.replace(BASE, version="9")) != batch_key(BASE)


def test_key_is_hex_sha256() -> None:
    k = op_key(BASE)
    assert len(k) == 64 and int(k, 16) >= 0
    assert not dataclasses.is_dataclass(k)


@pytest.mark.parametrize(
    "params",
    [
        BASE.params,
        {},
        {"prompt": 'é ✓ "quoted" \\ back', "nested": {"b": [1, 2], "a": None}},
        {"trap": ["\x00fm-inputs\x00"]},  # the keyer's own mark in params: keyed the slow way
    ],
)
@pytest.mark.parametrize("salt", ["", "tenant:t1"])
def test_a_waves_keyer_gives_op_keys(params: dict[str, object], salt: str) -> None:
    # the planner keys a wave's operators with one OpKeyer: the same keys, or dedup
    # against entries written before would silently stop matching
    base = msgspec.structs.replace(BASE, params=params, inputs=[])
    keyer = OpKeyer(base, salt)
    for inputs in (["a" * 64], ["b" * 64, "c" * 64], [], ["\x00fm-inputs\x00"]):
        assert keyer(inputs) == op_key(msgspec.structs.replace(base, inputs=inputs), salt)
