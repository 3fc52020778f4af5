"""Operator keys: the content address of a unit of work.

A key covers everything that determines an operator's output: kind, the executor and its
implementation version, canonical params (seed included), the model weights digest, and
the content digests of its inputs (never the identity of the upstream operator, so two
workflows that reach the same bytes by different routes share the work). The dedup scope
is mixed in as a salt: under `tenant` or `workflow` scope, keys of different tenants or
workflows never collide, so one can never receive, or time, another's result.
"""

from __future__ import annotations

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
