"""Built-in operator kinds and their parameter schemas: what a workflow node may ask for.

Both sides read this table: the engine validates specs against it before anything is
published, and workers decode params into the same Structs before executing.
A `map`/`filter` node names a Python transform (`fn`) from the workers' registry; which
transforms exist is advertised by workers at run time (see `streams.KV_EXECUTORS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Fanout = Literal["record", "all"]


class NoParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class TokenizeParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    field: str = "text"
    mode: Literal["whitespace", "words", "chars"] = "whitespace"
    lowercase: bool = True
    output_field: str = "tokens"


class JoinParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    on: str
    how: Literal["inner", "left"] = "inner"


class GroupParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    by: str
    agg: Literal["count", "collect", "sum", "mean"] = "count"
    field: str | None = None  # the field collect/sum/mean read


class GenerateParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    prompt_field: str = "prompt"
    output_field: str = "completion"
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0  # part of the key: a different seed is different work

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError("max_new_tokens must be in 1..4096")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass(frozen=True)
class OperatorKind:
    name: str
    fanout: Fanout
    params: type[msgspec.Struct] | None  # None: free-form kwargs for a named transform
    pool: str  # ready-subject pool the scheduler reads it from
    min_inputs: int = 1
    max_inputs: int = 1
    needs_fn: bool = False
    needs_model: bool = False
    # params that do not change what the batch computes together; everything else must
    # match for two operators to share a batch
    description: str = ""


KINDS: dict[str, OperatorKind] = {
    k.name: k
    for k in (
        OperatorKind(
            "map",
            "record",
            None,
            "cpu",
            needs_fn=True,
            description="apply a registered transform to each record",
        ),
        OperatorKind(
            "filter",
            "record",
            None,
            "cpu",
            needs_fn=True,
            description="keep records for which a registered predicate is true",
        ),
        OperatorKind(
            "tokenize",
            "record",
            TokenizeParams,
            "cpu",
            description="split a text field into tokens",
        ),
        OperatorKind(
            "join",
            "all",
            JoinParams,
            "cpu",
            min_inputs=2,
            max_inputs=2,
            description="join two datasets on a field",
        ),
        OperatorKind(
            "group", "all", GroupParams, "cpu", description="group records by a field and aggregate"
        ),
        OperatorKind(
            "generate",
            "record",
            GenerateParams,
            "gpu",
            needs_model=True,
            description="LLM text generation, batched",
        ),
    )
}


def executor_id(kind: str, fn: str | None) -> str:
    """The name under which a worker advertises the code that runs an operator."""
    return f"{kind}.{fn}" if fn else kind


def parse_params(kind: OperatorKind, params: dict[str, Any]) -> msgspec.Struct | dict[str, Any]:
    """Validate a node's params against its kind. Raises ValueError with the reason."""
    if kind.params is None:
        return params
    try:
        return msgspec.convert(params, type=kind.params)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad params for {kind.name}: {exc}") from exc
