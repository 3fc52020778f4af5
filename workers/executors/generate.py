"""Batched LLM generation (Hugging Face transformers) with our own decoding loop.

Why not `model.generate`: we need guarantees it does not make.
- A record's output must not depend on which other records share its batch (the
  scheduler batches whatever is ready). Left padding with position ids computed from the
  attention mask makes every row see exactly its own prompt; sampling draws from a
  per-row generator seeded by (seed, record, sample index), never from a shared RNG
  stream.
- The sample for a record is a function of its content, so re-running an operator (after
  a worker crash) reproduces the same output and its cached result stays valid.
Sampling runs on the CPU in float64 so a record's draw does not depend on the
accelerator's RNG or on the logits' dtype rounding inside the sort.

An operator with `n` samples becomes n rows of the decoding batch (one generator each),
so the samples of every operator in the batch decode together. It returns n records:
the input record plus the completion and `sample` (0..n-1).

The prompt handling (params, chat template, length check), the per-sample seeds, the
stop-string cut and the output record live in module-level helpers that the vLLM backend
(vllm_backend.py) reuses, so both backends take the same batch and return the same
record schema; only the token ids they decode differ.

torch is imported inside functions: the CPU worker imports this package without it.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from flowmesh.topics.codec import canonical
from flowmesh.topics.operators import GenerateParams
from flowmesh.workers.executors.base import OpError, OpInput, Outcome, Record
from flowmesh.workers.executors.transform import source_hash

if TYPE_CHECKING:
    import torch

# Rows (samples) decoded together at most: 16 operators x n=64 would otherwise make a
# 1024-row KV cache. Rows are independent of each other, so chunking changes no output.
MAX_DECODE_ROWS = 256
SAMPLE_FIELD = "sample"


class ModelLike(Protocol):
    """What the executors need of a loaded model (workers.models.LoadedModel)."""

    @property
    def digest(self) -> str: ...
    @property
    def model(self) -> Any: ...  # transformers PreTrainedModel, causal LM
    @property
    def tokenizer(self) -> Any: ...  # transformers tokenizer


@dataclass
class GenerateStats:
    """What one batch cost, for throughput figures (tokens/s) and benchmarks."""

    rows: int = 0  # samples decoded: sum of n over the operators that ran
    prompt_tokens: int = 0  # summed over rows
    new_tokens: int = 0  # generated, EOS excluded, before any stop-string cut


def row_seed(seed: int, record: Record, sample: int = 0) -> int:
    """The sampling seed of one sample of one record: sha256 of the seed, the sample
    index and the canonical JSON of the record. Sample 0 keeps the n=1 formula
    (sha256(f"{seed}:" + record)), so the first of n samples is the n=1 sample."""
    head = f"{seed}:" if sample == 0 else f"{seed}:{sample}:"
    # canonical JSON starts with "{", never a digit: the two forms cannot collide
    digest = hashlib.sha256(head.encode() + canonical(record)).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: valid for every seed API


@cache
def _module_version() -> str:
    # the whole module, not just the class: the decoding loop lives in functions below.
    # 2: n samples per prompt (records gained `sample`), stop strings, chat templates.
    return f"2+{source_hash(sys.modules[__name__])}"


# --- shared by both backends ---------------------------------------------------------


def parse_params(op: OpInput) -> GenerateParams:
    try:
        params = msgspec.convert(op.params, type=GenerateParams)
    except msgspec.ValidationError as exc:
        raise OpError(f"generate: bad params: {exc}", permanent=True) from exc
    if any(s == "" for s in params.stop):
        raise OpError("generate: bad params: an empty stop string would stop at once")
    if params.system is not None and not params.chat:
        # silently dropping it would answer a different question than the one asked
        raise OpError("generate: bad params: `system` needs `chat: true`")
    return params


def prompt_ids(params: GenerateParams, record: Record, model: ModelLike) -> list[int]:
    """The prompt's token ids: the record's prompt field, through the chat template when
    `chat` is on. Raises OpError for anything wrong with this record or these params."""
    prompt = record.get(params.prompt_field)
    if not isinstance(prompt, str):
        got = "missing" if params.prompt_field not in record else type(prompt).__name__
        raise OpError(f"generate: prompt field {params.prompt_field!r} is {got}, expected str")
    tok = model.tokenizer
    if params.chat:
        if not getattr(tok, "chat_template", None):
            raise OpError(
                "generate: chat is on, but the model's tokenizer has no chat template "
                "(use chat: false, or a model whose tokenizer_config.json has one)"
            )
        messages = [{"role": "user", "content": prompt}]
        if params.system is not None:
            messages.insert(0, {"role": "system", "content": params.system})
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors, templates that reject a system turn
            raise OpError(f"generate: the chat template failed: {exc}") from exc
        if not isinstance(text, str):
            raise OpError(f"generate: the chat template gave {type(text).__name__}, not text")
        # templates write the BOS token themselves (as HF's apply_chat_template(tokenize=
        # True) assumes): adding special tokens again would double it
        ids: list[int] = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tok(prompt)["input_ids"])  # adds BOS if the model uses it
    if not ids:
        raise OpError("generate: the prompt is empty and the tokenizer adds no BOS token")
    config = getattr(model.model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and len(ids) + params.max_new_tokens > limit:
        raise OpError(
            f"generate: {len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} "
            f"exceed the model's {limit} positions"
        )
    return ids


def prepare(op: OpInput, model: ModelLike) -> tuple[GenerateParams, Record, list[int]]:
    """Params, the input record and its prompt ids for one operator, or OpError."""
    params = parse_params(op)
    if len(op.inputs) != 1 or len(op.inputs[0]) != 1:
        raise OpError(f"generate: expected one input record, got {[len(s) for s in op.inputs]}")
    record = op.inputs[0][0]
    return params, record, prompt_ids(params, record, model)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def output_record(params: GenerateParams, record: Record, text: str, sample: int) -> Record:
    return {**record, params.output_field: text, SAMPLE_FIELD: sample}


def completion_text(model: ModelLike, params: GenerateParams, new_ids: Sequence[int]) -> str:
    """Decode a row's new tokens the one way both backends do, then apply the stops."""
    text: str = model.tokenizer.decode(list(new_ids), skip_special_tokens=True)
    return cut_at_stop(text, params.stop)


@dataclass(frozen=True)
class Row:
    """One sample of one operator: a row of the decoding batch."""

    op: int  # index in the batch
    sample: int
    record: Record
    ids: list[int]
    seed: int


def expand(
    batch: list[OpInput], model: ModelLike
) -> tuple[dict[GenerateParams, list[Row]], list[Outcome | None]]:
    """Operators -> rows grouped by params (n rows per operator, in sample order), and
    the outcome list with each failed operator's OpError already in place."""
    outcomes: list[Outcome | None] = [None] * len(batch)
    # the runtime batches operators with equal params; grouping again costs nothing
    # and keeps a mixed batch correct instead of silently using the first op's params
    groups: dict[GenerateParams, list[Row]] = {}
    for i, op in enumerate(batch):
        try:
            params, record, ids = prepare(op, model)
        except OpError as exc:
            outcomes[i] = exc
            continue
        outcomes[i] = []
        rows = groups.setdefault(params, [])
        rows.extend(
            Row(i, j, record, ids, row_seed(params.seed, record, j)) for j in range(params.n)
        )
    return groups, outcomes


def finish(outcomes: list[Outcome | None]) -> list[Outcome]:
    return [o if o is not None else OpError("internal: no outcome") for o in outcomes]


# --- the HF backend --------------------------------------------------------------------


class GenerateExecutor:
    id = "generate"
    kind = "generate"
    max_batch = 16

    @property
    def version(self) -> str:
        return _module_version()

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        return self.generate(batch, model)[0]

    def generate(
        self, batch: list[OpInput], model: Any | None
    ) -> tuple[list[Outcome], GenerateStats]:
        """run(), and what it decoded."""
        stats = GenerateStats()
        if model is None:
            return [OpError("generate needs a model, and none was loaded") for _ in batch], stats
        groups, outcomes = expand(batch, model)
        for params, rows in groups.items():
            for start in range(0, len(rows), MAX_DECODE_ROWS):
                chunk = rows[start : start + MAX_DECODE_ROWS]
                new = decode_ids(model, params, [r.ids for r in chunk], [r.seed for r in chunk])
                for row, new_ids in zip(chunk, new, strict=True):
                    out = outcomes[row.op]
                    assert isinstance(out, list)  # set by expand() for every op with rows
                    out.append(
                        output_record(
                            params, row.record, completion_text(model, params, new_ids), row.sample
                        )
                    )
                    stats.rows += 1
                    stats.prompt_tokens += len(row.ids)
                    stats.new_tokens += len(new_ids)
        return finish(outcomes), stats


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


class _StopWatch:
    """Notices when a row's text first contains a stop string, so the row stops early.

    Decoding a row's whole output after every token would cost O(len^2); the check
    decodes only a tail window wide enough to hold any stop string (a token is at least
    one byte, a character at most four), and confirms a hit on the full text so a
    window that starts inside a character cannot stop a row early. A miss only costs
    extra tokens: the completion is cut at the first stop string of the full text anyway,
    which is why the result never depends on when the watch noticed."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.window = 4 * max((len(s) for s in stop), default=0) + 4

    def hit(self, ids: list[int]) -> bool:
        if not self.stop:
            return False
        tail: str = self.tokenizer.decode(ids[-self.window :], skip_special_tokens=True)
        if not any(s in tail for s in self.stop):
            return False
        full: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in full for s in self.stop)


def decode_ids(
    model: ModelLike, params: GenerateParams, prompts: Sequence[list[int]], seeds: Sequence[int]
) -> list[list[int]]:
    """Generate for a batch of tokenized prompts; returns each row's new token ids
    (without the stopping EOS). seeds[i] seeds row i's sampler (unused when greedy).
    A row stops at EOS, at max_new_tokens, or once its text contains a stop string."""
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
    watch = _StopWatch(model.tokenizer, params.stop)
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
                    done[row] = watch.hit(out[row])
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
