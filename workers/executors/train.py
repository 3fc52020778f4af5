"""LoRA fine-tuning (SFT or DPO) with peft on torch: one operator = one training run.

Input: one list of records (the node's whole input). `model` is the loaded base; when
the operator names an adapter it is base+adapter, and training *continues* from that
adapter (its own LoRA rank and targets are kept; lora_r/lora_alpha apply to new
adapters only). Output: one record

    {"adapter": <adapter digest>, "base": <base model digest>, "method", "steps",
     "loss_before", "loss_after", "examples"}

The executor does no I/O: "adapter" holds an `AdapterFiles` (the adapter's files), which
the runtime stores with put_adapter and replaces by its digest before it puts the record
(workers.models.store_artifacts). The digest is a pure function of the files and the
base, so it is the same whoever stores it.

What stays untouched: the resident model other batches use. Training runs on a copy of
its module tree that shares the base's (frozen) weight tensors; only the LoRA weights are
new. The run is deterministic on one machine: LoRA init and minibatch order come from
generators seeded by `seed`, there is no dropout, and the same data gives the same
adapter bytes. (Across machines, float reductions may differ with the thread count or
the device, as for any training.)

SFT: mean cross-entropy over completion tokens (the prompt is masked out), completion +
EOS. DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with sequence log-probs
summed over completion tokens; the reference is the model the run starts from (the base,
or base+adapter when continuing), whose log-probs are computed once before the first
step: the reference is frozen, so that is exactly what a frozen copy would give.
loss_before / loss_after are the loss over the whole input before the first step and
after the last (for DPO, loss_before is log 2: policy and reference start equal).

torch and peft are imported inside functions: the CPU worker imports this package
without them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import msgspec

from flowmesh.topics.operators import MAX_TRAIN_BATCH, MAX_TRAIN_STEPS, TrainParams
from flowmesh.workers.executors.base import Deadline, OpError, OpInput, Outcome, Record
from flowmesh.workers.executors.transform import source_hash

if TYPE_CHECKING:
    import torch

IGNORE = -100  # label of a position that is not trained on (prompt, padding)
EVAL_CHUNK = 16  # examples per forward pass when measuring the loss over the whole input


@cache
def _module_version() -> str:
    from flowmesh.workers.models import adapters

    # the adapter's serialisation is part of what this executor outputs
    return f"1+{source_hash(sys.modules[__name__])}.{source_hash(adapters)[:6]}"


class TrainExecutor:
    id = "train"
    kind = "train"
    max_batch = 1  # a training run uses the whole device; batching two buys nothing

    @property
    def version(self) -> str:
        return _module_version()

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        if model is None:
            return [OpError("train needs a model, and none was loaded") for _ in batch]
        outcomes: list[Outcome] = []
        for op in batch:
            try:
                outcomes.append([train_one(op, model)])
            except OpError as exc:
                outcomes.append(exc)
        return outcomes


# --- examples -------------------------------------------------------------------------


@dataclass(frozen=True)
class Seq:
    """A tokenized prompt + completion; the completion ends with EOS."""

    prompt: list[int]
    completion: list[int]


@dataclass(frozen=True)
class Example:
    seqs: tuple[Seq, ...]  # SFT: (prompt+completion,); DPO: (chosen, rejected)


def _text(record: Record, field: str, i: int) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        got = "missing" if field not in record else type(value).__name__
        raise OpError(f"train: record {i}: field {field!r} is {got}, expected str")
    return value


def _tokenize(model: Any, prompt: str, completion: str, limit: int | None) -> Seq:
    tok = model.tokenizer
    p = list(tok(prompt)["input_ids"])  # with BOS if the model uses one
    c = list(tok(completion, add_special_tokens=False)["input_ids"])
    if isinstance(tok.eos_token_id, int):
        c.append(tok.eos_token_id)  # learn to stop after the completion
    if limit is not None and len(p) + len(c) > limit:
        raise OpError(f"train: an example of {len(p) + len(c)} tokens exceeds {limit} positions")
    return Seq(p, c)


def examples(records: list[Record], params: TrainParams, model: Any) -> list[Example]:
    limit = getattr(model.model.config, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) else None
    out = []
    for i, r in enumerate(records):
        prompt = _text(r, params.prompt_field, i)
        seqs: tuple[Seq, ...]
        if params.method == "sft":
            seqs = (_tokenize(model, prompt, _text(r, params.completion_field, i), limit),)
        else:
            chosen = _tokenize(model, prompt, _text(r, params.chosen_field, i), limit)
            rejected = _tokenize(model, prompt, _text(r, params.rejected_field, i), limit)
            seqs = (chosen, rejected)
        out.append(Example(seqs))
    return out


# --- training -------------------------------------------------------------------------


def train_one(op: OpInput, model: Any) -> Record:
    from flowmesh.workers.models.adapters import AdapterFiles, adapter_files

    try:
        params = msgspec.convert(op.params, type=TrainParams)
    except msgspec.ValidationError as exc:
        raise OpError(f"train: bad params: {exc}", permanent=True) from exc
    if params.steps < 1 or params.batch_size < 1 or params.lr <= 0 or params.lora_r < 1:
        raise OpError("train: steps, batch_size, lora_r must be >= 1 and lr > 0")
    if params.steps > MAX_TRAIN_STEPS or params.batch_size > MAX_TRAIN_BATCH:
        raise OpError(
            f"train: at most {MAX_TRAIN_STEPS} steps and batch_size {MAX_TRAIN_BATCH} per "
            "operator (chain train nodes for more)"
        )
    if getattr(model, "task", "causal-lm") != "causal-lm":
        raise OpError(f"train: needs a causal LM, the model is a {model.task}")
    if len(op.inputs) != 1:
        raise OpError(f"train: expected one input, got {len(op.inputs)}")
    if not op.inputs[0]:
        raise OpError("train: no examples")
    data = examples(op.inputs[0], params, model)
    peft_model = trainable_copy(model, params)
    loss_before, loss_after = fit(
        peft_model.get_base_model(), data, params, _pad_id(model), Deadline()
    )
    return {
        "adapter": AdapterFiles(model.digest, adapter_files(peft_model)),
        "base": model.digest,
        "method": params.method,
        "steps": params.steps,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "examples": len(data),
    }


def _pad_id(model: Any) -> int:
    pad = model.tokenizer.pad_token_id
    return pad if isinstance(pad, int) else 0  # any id: padded positions are masked out


def trainable_copy(model: Any, params: TrainParams) -> Any:
    """A peft model to train, over a copy of `model`'s module tree that shares its frozen
    weights: a new LoRA adapter (seeded init), or the model's own adapter to continue."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flowmesh.workers.models.adapters import attention_targets, is_lora, shared_copy

    if getattr(model, "peft_model", None) is not None:
        # continue: share the base weights, copy the adapter's LoRA weights to train them
        peft_model = shared_copy(model.peft_model, share=lambda name: not is_lora(name))
        for name, p in peft_model.named_parameters():
            p.requires_grad_(is_lora(name))
    else:
        config = LoraConfig(
            r=params.lora_r,
            lora_alpha=params.lora_alpha,
            target_modules=attention_targets(model.model),
            lora_dropout=0.0,  # dropout would make the run depend on an RNG stream
            bias="none",
            task_type="CAUSAL_LM",
        )
        base = shared_copy(model.model)
        # LoRA's A matrices are drawn from torch's global RNG: seed it for this init
        # only, leaving the caller's stream as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            peft_model = get_peft_model(base, config)
    # eval mode: no dropout anywhere (gradients flow in eval mode all the same)
    torch.nn.Module.eval(peft_model)
    return peft_model


def _batches(n: int, params: TrainParams) -> Iterator[list[int]]:
    """`steps` minibatches of example indices: shuffled epochs (a fresh permutation
    when the current one has fewer than batch_size left), seeded by params.seed."""
    import torch

    gen = torch.Generator().manual_seed(params.seed)
    size = min(params.batch_size, n)
    order: list[int] = []
    for _ in range(params.steps):
        if len(order) < size:
            order = [int(i) for i in torch.randperm(n, generator=gen).tolist()]
        yield order[:size]
        order = order[size:]


def fit(
    lm: Any,
    data: list[Example],
    params: TrainParams,
    pad_id: int,
    deadline: Deadline | None = None,
) -> tuple[float, float]:
    """Train the LoRA weights of `lm` in place; returns (loss before, loss after) over
    the whole input."""
    import torch

    ref_logps = torch.zeros(len(data), 2)  # SFT has no reference
    if params.method == "dpo":
        with torch.no_grad():
            # the start-of-run log-probs are the frozen reference's
            ref = [_seq_logps(lm, [ex.seqs for ex in chunk], pad_id) for chunk in _chunks(data)]
        ref_logps = torch.cat(ref)
    loss_before = _dataset_loss(lm, data, params, ref_logps, pad_id)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    # no weight decay: LoRA's B starts at zero and decaying it only fights the update
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
    for idx in _batches(len(data), params):
        if deadline is not None:
            deadline.check("train")  # the operator's wall-time limit, between steps
        opt.zero_grad(set_to_none=True)
        loss = _loss(lm, [data[i] for i in idx], params, ref_logps[idx], pad_id)
        loss.backward()
        opt.step()
    for p in trainable:
        p.requires_grad_(False)
    return loss_before, _dataset_loss(lm, data, params, ref_logps, pad_id)


def _chunks(data: list[Example]) -> Iterator[list[Example]]:
    for i in range(0, len(data), EVAL_CHUNK):
        yield data[i : i + EVAL_CHUNK]


def _dataset_loss(
    lm: Any, data: list[Example], params: TrainParams, ref_logps: torch.Tensor, pad_id: int
) -> float:
    """Mean loss over every example (SFT: over every completion token)."""
    import torch

    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), EVAL_CHUNK):
            chunk = data[start : start + EVAL_CHUNK]
            ref = ref_logps[start : start + EVAL_CHUNK]
            sft = params.method == "sft"
            w = sum(len(ex.seqs[0].completion) for ex in chunk) if sft else len(chunk)
            total += float(_loss(lm, chunk, params, ref, pad_id)) * w
            weight += w
    return total / weight


def _loss(
    lm: Any, batch: list[Example], params: TrainParams, ref_logps: torch.Tensor, pad_id: int
) -> torch.Tensor:
    import torch

    if params.method == "sft":
        logps, mask = _token_logps(lm, [ex.seqs[0] for ex in batch], pad_id)
        return -(logps * mask).sum() / mask.sum().clamp(min=1)
    pi = _seq_logps(lm, [ex.seqs for ex in batch], pad_id)  # [B, 2]: chosen, rejected
    margin = (pi[:, 0] - ref_logps[:, 0]) - (pi[:, 1] - ref_logps[:, 1])
    return -torch.nn.functional.logsigmoid(params.beta * margin).mean()


def _seq_logps(lm: Any, pairs: Sequence[tuple[Seq, ...]], pad_id: int) -> torch.Tensor:
    """Summed completion log-probs, [n, k] for n examples of k sequences each; all
    sequences go through the model in one forward pass."""
    k = len(pairs[0])
    flat = [seqs[j] for j in range(k) for seqs in pairs]  # column-major: seq j of all
    logps, mask = _token_logps(lm, flat, pad_id)
    return (logps * mask).sum(-1).view(k, len(pairs)).T


def _token_logps(lm: Any, seqs: Sequence[Seq], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of each next token and a mask of the completion positions:
    both [n, width-1]. Rows are right-padded: every row's tokens sit at positions
    0..len-1, which is what the model's default position ids give them."""
    import torch

    device = lm.device
    width = max(len(s.prompt) + len(s.completion) for s in seqs)
    ids, att, labels = [], [], []
    for s in seqs:
        row = s.prompt + s.completion
        pad = width - len(row)
        ids.append(row + [pad_id] * pad)
        att.append([1] * len(row) + [0] * pad)
        labels.append([IGNORE] * len(s.prompt) + s.completion + [IGNORE] * pad)
    input_ids = torch.tensor(ids, device=device)
    logits = lm(
        input_ids=input_ids,
        attention_mask=torch.tensor(att, device=device),
        use_cache=False,
    ).logits[:, :-1, :]
    target = torch.tensor(labels, device=device)[:, 1:]
    mask = (target != IGNORE).to(logits.dtype)
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked, mask.float()
