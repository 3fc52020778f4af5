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
    n: int = 1  # samples per prompt: n output records, each with `sample` = 0..n-1
    stop: tuple[str, ...] = ()  # cut the completion at the first of these
    chat: bool = False  # wrap the prompt in the model's chat template as a user turn
    system: str | None = None  # system message when chat is on

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError("max_new_tokens must be in 1..4096")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 1 <= self.n <= 64:
            raise ValueError("n must be in 1..64")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0 (greedy samples are all alike)")


class EmbedParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    field: str = "text"
    output_field: str = "embedding"
    normalize: bool = True


class ScoreParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Rule-based rewards, or an LLM judge (rule `judge`, with the node's `model`)."""

    rule: Literal["exact_match", "contains", "regex", "length", "judge"]
    field: str = "completion"
    reference_field: str = "answer"  # exact_match / contains
    pattern: str | None = None  # regex: score 1 if it matches
    target_len: int | None = None  # length: 1 at the target, falling off linearly
    output_field: str = "score"
    # judge: the template gets the record's fields; the judge's first number is the score
    judge_template: str = (
        "Rate the answer from 0 to 10.\nQuestion: {prompt}\nAnswer: {completion}\nRating:"
    )
    max_new_tokens: int = 8


class SelectParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Selection over scored samples grouped by a field (one group per prompt)."""

    method: Literal["best_of_n", "rejection", "top_k", "pairs"]
    group_by: str = "prompt"
    score_field: str = "score"
    text_field: str = "completion"
    k: int = 1  # top_k
    threshold: float = 0.5  # rejection: keep samples scoring at least this


# One train operator's bounds (checked at submit and by the worker): `steps: 10**12` ran
# forever on a shared worker. Longer training is a chain of train nodes.
MAX_TRAIN_STEPS = 10_000
MAX_TRAIN_BATCH = 256


class TrainParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A LoRA fine-tuning step on the node's model; the output is one record naming
    the adapter's digest in the CAS (and the loss before and after)."""

    method: Literal["sft", "dpo"]
    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    beta: float = 0.1  # dpo
    seed: int = 0
    prompt_field: str = "prompt"
    completion_field: str = "completion"  # sft
    chosen_field: str = "chosen"  # dpo
    rejected_field: str = "rejected"  # dpo


class EvalParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One record out: the metric over the whole input."""

    metric: Literal["accuracy", "mean"]
    field: str = "completion"  # accuracy: prediction; mean: the value averaged
    reference_field: str = "answer"
    match: Literal["exact", "contains"] = "contains"


@dataclass(frozen=True)
class OperatorKind:
    name: str
    fanout: Fanout
    params: type[msgspec.Struct] | None  # None: free-form kwargs for a named transform
    pool: str  # ready-subject pool the scheduler reads it from
    min_inputs: int = 1
    max_inputs: int = 1
    needs_fn: bool = False
    model: Literal["required", "optional", "none"] = "none"
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
            model="required",
            description="LLM text generation, batched; n samples per prompt",
        ),
        OperatorKind(
            "embed",
            "record",
            EmbedParams,
            "gpu",
            model="required",
            description="sentence embedding of a text field",
        ),
        OperatorKind(
            "score",
            "record",
            ScoreParams,
            "cpu",
            model="optional",
            description="reward: exact match, contains, regex, length, or an LLM judge",
        ),
        OperatorKind(
            "select",
            "all",
            SelectParams,
            "cpu",
            description="best-of-n, rejection sampling, top-k, preference pairs",
        ),
        OperatorKind(
            "train",
            "all",
            TrainParams,
            "gpu",
            model="required",
            description="a LoRA SFT or DPO step; outputs the adapter's digest",
        ),
        OperatorKind(
            "eval", "all", EvalParams, "cpu", description="accuracy or mean over a dataset"
        ),
        OperatorKind(
            "tool",
            "record",
            None,
            "cpu",
            needs_fn=True,
            description="an agent step calling a registered Python tool",
        ),
    )
}


def pool_of(kind: str) -> str:
    """The ready pool an operator of `kind` waits in; "cpu" for a kind this build does
    not know (a newer planner's), so it is still scheduled, or dead-lettered, somewhere."""
    spec = KINDS.get(kind)
    return spec.pool if spec else "cpu"


# A worker advertises a tool whose result is not a function of its input (it reads the
# clock, the network, a random source) with this suffix on its version. The planner
# salts such operators' keys with a fresh nonce: they are never deduplicated.
NONDETERMINISTIC = "+nondet"


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
