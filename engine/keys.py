"""Operator keys: the content address of a unit of work.

A key covers everything that determines an operator's output: kind, the executor and its
implementation version, canonical params (seed included), the model weights digest, and
the content digests of its inputs (never the identity of the upstream operator, so two
workflows that reach the same bytes by different routes share the work). The dedup scope
is mixed in as a salt: under `tenant` or `workflow` scope, keys of different tenants or
workflows never collide, so one can never receive, or time, another's result.
"""

from __future__ import annotations

import hashlib

import msgspec

from flowmesh.topics import codec
from flowmesh.topics.messages import DedupScope, OpSpec

KEY_SCHEME = "fm-op-v1"


def scope_salt(scope: DedupScope, tenant: str, workflow_id: str) -> str:
    if scope == "global":
        return ""
    if scope == "tenant":
        return f"tenant:{tenant}"
    return f"workflow:{workflow_id}"


def op_key(spec: OpSpec, salt: str = "") -> str:
    return codec.digest_of({"scheme": KEY_SCHEME, "op": codec.to_builtins(spec), "salt": salt})


# stands for a wave's inputs in the canonical bytes of its shared spec; a spec whose
# params happen to hold it is keyed the slow way
_INPUTS_MARK = "\x00fm-inputs\x00"


class OpKeyer:
    """op_key of operators that share `base` and `salt` and differ only in their inputs,
    as the same bytes hashed: the canonical JSON before and after the inputs is encoded
    once per wave, not once per operator (to_builtins and a sorted encode of the whole
    spec were a tenth of the planner's CPU per operator)."""

    def __init__(self, base: OpSpec, salt: str = "") -> None:
        self._base, self._salt = base, salt
        marked = msgspec.structs.replace(base, inputs=[_INPUTS_MARK])
        blob = codec.canonical(
            {"scheme": KEY_SCHEME, "op": codec.to_builtins(marked), "salt": salt}
        )
        parts = blob.split(codec.canonical([_INPUTS_MARK]))
        self._around = (parts[0], parts[1]) if len(parts) == 2 else None

    def __call__(self, inputs: list[str]) -> str:
        if self._around is None:
            return op_key(msgspec.structs.replace(self._base, inputs=inputs), self._salt)
        before, after = self._around
        return hashlib.sha256(before + codec.canonical(inputs) + after).hexdigest()


def batch_key(spec: OpSpec) -> str:
    """Operators that may run in one batch: same executor build, params and model; only
    their inputs differ."""
    return codec.digest_of(
        {
            "executor": spec.executor,
            "version": spec.version,
            "fanout": spec.fanout,
            "params": spec.params,
            "model": spec.model,
            "adapter": spec.adapter,
        }
    )
