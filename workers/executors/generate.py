"""Batched LLM generation with our own decoding loop over the KV cache.

Why not `model.generate`: we need guarantees it does not make.
- A record's output must not depend on which other records share its batch (the
  scheduler batches whatever is ready). Left padding with position ids computed from the
  attention mask makes every row see exactly its own prompt; sampling draws from a
  per-row generator seeded by (seed, record), never from a shared RNG stream.
- The sample for a record is a function of its content, so re-running an operator (after
  a worker crash) reproduces the same output and its cached result stays valid.
Sampling runs on the CPU in float64 so a record's draw does not depend on the
accelerator's RNG or on the logits' dtype rounding inside the sort.

torch is imported inside functions: the CPU worker imports this package without it.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from topics.codec import canonical
from topics.operators import GenerateParams
from workers.executors.base import OpError, OpInput, Outcome, Record
from workers.executors.transform import source_hash

if TYPE_CHECKING:
    import torch


class ModelLike(Protocol):
    """What the executor needs of a loaded model (workers.models.LoadedModel)."""

    @property
    def digest(self) -> str: ...
    @property
    def model(self) -> Any: ...  # transformers PreTrainedModel, causal LM
    @property
    def tokenizer(self) -> Any: ...  # transformers tokenizer


def row_seed(seed: int, record: Record) -> int:
    """The sampling seed of one record: sha256(f"{seed}:" + canonical JSON of it)."""
    digest = hashlib.sha256(f"{seed}:".encode() + canonical(record)).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: valid for every seed API


@cache
def _module_version() -> str:
    # the whole module, not just the class: the decoding loop lives in functions below
    return f"1+{source_hash(sys.modules[__name__])}"


class GenerateExecutor:
    id = "generate"
    kind = "generate"
    max_batch = 16

    @property
    def version(self) -> str:
        return _module_version()

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        if model is None:
            return [OpError("generate needs a model, and none was loaded") for _ in batch]
        outcomes: list[Outcome | None] = [None] * len(batch)
        # the runtime batches operators with equal params; grouping again costs nothing
        # and keeps a mixed batch correct instead of silently using the first op's params
        groups: dict[GenerateParams, list[tuple[int, Record, list[int]]]] = {}
        for i, op in enumerate(batch):
            try:
                params, record, ids = _prepare(op, model)
            except OpError as exc:
                outcomes[i] = exc
                continue
            groups.setdefault(params, []).append((i, record, ids))
        for params, rows in groups.items():
            seeds = [row_seed(params.seed, record) for _, record, _ in rows]
            completions = decode_ids(model, params, [ids for _, _, ids in rows], seeds)
            for (i, record, _), new_ids in zip(rows, completions, strict=True):
                text = model.tokenizer.decode(new_ids, skip_special_tokens=True)
                outcomes[i] = [{**record, params.output_field: text}]
        return [o if o is not None else OpError("internal: no outcome") for o in outcomes]


def _prepare(op: OpInput, model: ModelLike) -> tuple[GenerateParams, Record, list[int]]:
    try:
        params = msgspec.convert(op.params, type=GenerateParams)
    except msgspec.ValidationError as exc:
        raise OpError(f"generate: bad params: {exc}") from exc
    if len(op.inputs) != 1 or len(op.inputs[0]) != 1:
        raise OpError(f"generate: expected one input record, got {[len(s) for s in op.inputs]}")
    record = op.inputs[0][0]
    prompt = record.get(params.prompt_field)
    if not isinstance(prompt, str):
        got = "missing" if params.prompt_field not in record else type(prompt).__name__
        raise OpError(f"generate: prompt field {params.prompt_field!r} is {got}, expected str")
    ids: list[int] = list(model.tokenizer(prompt)["input_ids"])  # adds BOS if the model uses it
    if not ids:
        raise OpError("generate: the prompt is empty and the tokenizer adds no BOS token")
    limit = getattr(model.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and len(ids) + params.max_new_tokens > limit:
        raise OpError(
            f"generate: {len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} "
            f"exceed the model's {limit} positions"
        )
    return params, record, ids


def _eos_ids(model: ModelLike) -> set[int]:
    found: set[int] = set()
    sources = (
        model.tokenizer.eos_token_id,
        getattr(model.model.config, "eos_token_id", None),
        getattr(getattr(model.model, "generation_config", None), "eos_token_id", None),
    )
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(v for v in value if isinstance(v, int))
    return found


def _forward_names(lm: Any) -> tuple[str, str | None]:
    """transformers renamed forward kwargs across versions; ask the signature which this
    one has: (cache kwarg, keep-only-last-logits kwarg or None)."""
    names = inspect.signature(lm.forward).parameters
    cache_kw = "cache" if "cache" in names else "past_key_values"
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in names), None)
    return cache_kw, keep_kw


def decode_ids(
    model: ModelLike, params: GenerateParams, prompts: Sequence[list[int]], seeds: Sequence[int]
) -> list[list[int]]:
    """Generate for a batch of tokenized prompts; returns each row's new token ids
    (without the stopping EOS). seeds[i] seeds row i's sampler (unused when greedy)."""
    import torch

    if not prompts:
        return []
    lm = model.model
    device = lm.device
    n, width = len(prompts), max(len(p) for p in prompts)
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:  # any id works: padded positions are masked out
        pad_id = 0
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # Each row's real tokens sit at positions 0..len-1 whatever its padding, which is
    # what makes a padded row compute the same thing as the row alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = _eos_ids(model)
    sampling = params.temperature > 0
    gens = [torch.Generator().manual_seed(s) for s in seeds] if sampling else []
    cache_kw, keep_kw = _forward_names(lm)
    extra = {keep_kw: 1} if keep_kw else {}

    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * n
    past: Any = None
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            result = lm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_kw: past},
                **extra,
            )
            past = result.get("cache", None)
            if past is None:  # older transformers name it past_key_values
                past = result.get("past_key_values", None)
            logits = result.logits[:, -1, :]
            if sampling:
                picked = _sample_rows(logits, params, gens, done)
            else:
                picked = [int(t) for t in logits.argmax(dim=-1).tolist()]
            for row, token in enumerate(picked):
                if done[row]:
                    continue
                if token in eos:
                    done[row] = True
                else:
                    out[row].append(token)
            if all(done):
                break
            # finished rows keep stepping (their tokens are ignored): removing them would
            # change the batch shape under the rows still running
            ids = torch.tensor(picked, device=device).unsqueeze(1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
    return out


def _sample_rows(
    logits: torch.Tensor, params: GenerateParams, gens: list[torch.Generator], done: list[bool]
) -> list[int]:
    import torch

    rows = logits.detach().to("cpu", torch.float64)
    picked = []
    for row, gen in enumerate(gens):
        picked.append(0 if done[row] else _sample_one(rows[row], params, gen))
    return picked


def _sample_one(logits: torch.Tensor, params: GenerateParams, gen: torch.Generator) -> int:
    """Temperature + nucleus (top-p) sampling by inverse CDF with one uniform draw."""
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    # stable sort: equal probabilities keep id order, so ties never depend on the kernel
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=0)
    # the smallest prefix whose mass reaches top_p (always at least the top token)
    keep = min(int((cum < params.top_p).sum().item()) + 1, sorted_p.numel())
    cum = cum[:keep]
    u = torch.rand((), generator=gen, dtype=torch.float64) * cum[-1]
    j = min(int(torch.searchsorted(cum, u, right=True).item()), keep - 1)
    return int(order[j].item())
