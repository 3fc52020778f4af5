"""Sentence embeddings: an encoder's last hidden states, mean-pooled over the real
(attention-masked) tokens, optionally L2-normalised. That is what all-MiniLM-L6-v2 and
most sentence-transformers models compute, so the vectors match theirs.

The batch runs as one padded forward pass. Padding is masked out exactly, but a
different batch shape can change float reductions in the last bits (~1e-6): a record's
vector does not depend on its batch beyond that. The first committed result is the
one every later request reuses.

torch is imported inside functions: the CPU worker imports this package without it.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

import msgspec

from flowmesh.topics.operators import EmbedParams
from flowmesh.workers.executors.base import OpError, OpInput, Outcome, Record
from flowmesh.workers.executors.transform import source_hash


@cache
def _module_version() -> str:
    return f"1+{source_hash(sys.modules[__name__])}"


class EmbedExecutor:
    id = "embed"
    kind = "embed"
    max_batch = 64

    @property
    def version(self) -> str:
        return _module_version()

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        if model is None:
            return [OpError("embed needs a model, and none was loaded") for _ in batch]
        task = getattr(model, "task", "embedding")
        if task != "embedding":
            # a causal LM's output is logits, not hidden states to pool
            return [OpError(f"embed needs an embedding model, not a {task}") for _ in batch]
        outcomes: list[Outcome | None] = [None] * len(batch)
        rows: list[tuple[int, EmbedParams, Record, str]] = []
        for i, op in enumerate(batch):
            try:
                rows.append((i, *_prepare(op)))
            except OpError as exc:
                outcomes[i] = exc
        if rows:
            # params (normalize, fields) apply after pooling: one pass serves them all
            vectors = embed_texts(model, [text for _, _, _, text in rows], normalize=False)
            for (i, params, record, _), vec in zip(rows, vectors, strict=True):
                out = _l2_normalize(vec) if params.normalize else vec
                outcomes[i] = [{**record, params.output_field: out}]
        return [o if o is not None else OpError("internal: no outcome") for o in outcomes]


def _prepare(op: OpInput) -> tuple[EmbedParams, Record, str]:
    try:
        params = msgspec.convert(op.params, type=EmbedParams)
    except msgspec.ValidationError as exc:
        raise OpError(f"embed: bad params: {exc}", permanent=True) from exc
    if len(op.inputs) != 1 or len(op.inputs[0]) != 1:
        raise OpError(f"embed: expected one input record, got {[len(s) for s in op.inputs]}")
    record = op.inputs[0][0]
    text = record.get(params.field)
    if not isinstance(text, str):
        got = "missing" if params.field not in record else type(text).__name__
        raise OpError(f"embed: field {params.field!r} is {got}, expected str")
    return params, record, text


def embed_texts(model: Any, texts: list[str], normalize: bool = True) -> list[list[float]]:
    """Mean-pooled (and optionally L2-normalised) embeddings of `texts`, truncated at the
    tokenizer's model_max_length (the sentence-transformers limit when the model has one)."""
    import torch

    tok = model.tokenizer
    if tok.pad_token_id is None and len(texts) > 1:
        # nothing to pad with (a decoder used as an encoder): one text per pass
        return [v for t in texts for v in embed_texts(model, [t], normalize)]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    enc = {k: v.to(model.model.device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.model(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)).float()
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    vectors: list[list[float]] = pooled.cpu().tolist()
    return vectors


def _l2_normalize(vec: list[float]) -> list[float]:
    """As torch.nn.functional.normalize does it, in float32, so the numbers are the
    ones a normalised embed_texts would give."""
    import torch

    t = torch.tensor(vec, dtype=torch.float32)
    normalized: list[float] = torch.nn.functional.normalize(t, p=2, dim=-1).tolist()
    return normalized
