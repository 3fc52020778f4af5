"""LoRA adapters as content, and the torch-side helpers that apply and serialise them.

An adapter's manifest is {"base": <model digest>, "task": "lora-adapter", "files":
{file name: digest}} with the two files peft reads (adapter_config.json and
adapter_model.safetensors). Its digest is a pure function of the base and the files'
bytes (`adapter_digest`), so an executor can name the adapter it made without I/O; the
runtime stores it (`store_artifacts`), as it stores every other output.

Adapters are applied to a *shared copy* of the base (`shared_copy`): a new module tree
whose frozen weight tensors are the base's own. peft injects LoRA layers into the tree it
is given; giving it the copy leaves the resident base (used by other batches) untouched
and costs only the LoRA weights in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowmesh.topics.codec import digest_of, is_digest, sha256_hex
from flowmesh.topics.store.cas import CAS
from flowmesh.workers.models.store import ADAPTER_TASK, LoadedModel, check_file_name, put_blob

Record = dict[str, Any]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Linear layers LoRA targets, by architecture family: the attention projections.
# The first family with a match in the model wins.
ATTENTION_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, SmolLM, ...
    ("query", "key", "value"),  # BERT and its descendants
    ("c_attn", "c_proj"),  # GPT-2
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon
    ("qkv_proj", "out_proj"),
)


# --- adapters as content --------------------------------------------------------------


def _adapter_manifest(base_digest: str, adapter_files: dict[str, bytes]) -> Record:
    if not is_digest(base_digest):
        raise ValueError(f"not a model digest: {base_digest!r}")
    if not adapter_files:
        raise ValueError("an adapter needs at least one file")
    for fname in adapter_files:
        check_file_name(fname)
    files = {f: sha256_hex(data) for f, data in sorted(adapter_files.items())}
    return {"base": base_digest, "task": ADAPTER_TASK, "files": files}


def adapter_digest(base_digest: str, adapter_files: dict[str, bytes]) -> str:
    """The digest `put_adapter` returns for these files, computed without any I/O."""
    return digest_of(_adapter_manifest(base_digest, adapter_files))


async def put_adapter(cas: CAS, base_digest: str, adapter_files: dict[str, bytes]) -> str:
    """Store a LoRA adapter's files and its manifest; returns the adapter digest."""
    manifest = _adapter_manifest(base_digest, adapter_files)
    for fname, data in sorted(adapter_files.items()):
        await put_blob(cas, data)
        assert manifest["files"][fname] == sha256_hex(data)
    return await cas.put_record(manifest)


@dataclass(frozen=True, eq=False)
class AdapterFiles:
    """An adapter an executor produced, standing in a record field for its digest.

    Executors do no I/O; the runtime replaces every AdapterFiles value of an output
    record with the digest `put_adapter` stores it under (`store_artifacts`) before it
    puts the record. The digest it gets is `self.digest`."""

    base: str
    files: dict[str, bytes]

    @property
    def digest(self) -> str:
        return adapter_digest(self.base, self.files)


async def store_artifacts(cas: CAS, record: Record) -> Record:
    """Store the AdapterFiles among a record's top-level values, and return the record
    with each replaced by its digest. A record without any is returned as it is."""
    if not any(isinstance(v, AdapterFiles) for v in record.values()):
        return record
    out = dict(record)
    for field, value in record.items():
        if isinstance(value, AdapterFiles):
            out[field] = await put_adapter(cas, value.base, value.files)
    return out


# --- torch side -----------------------------------------------------------------------


def shared_copy(module: Any, share: Callable[[str], bool] = lambda _name: True) -> Any:
    """A deep copy of a torch module whose parameters named by `share` are frozen
    Parameters over the *same storage* as the original's (no weight memory copied, and
    the original's Parameter objects, requires_grad included, are left alone). Tied
    weights stay tied. Parameters not shared (LoRA weights) are copied for real."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if share(name) and id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
    return copy.deepcopy(module, memo)


def is_lora(name: str) -> bool:
    return "lora_" in name


def attention_targets(model: Any) -> list[str]:
    """Names of the attention projection Linear layers this model has (LoRA targets)."""
    import torch

    present = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"  # GPT-2
    }
    for family in ATTENTION_PROJECTIONS:
        found = [n for n in family if n in present]
        if found:
            return found
    raise ValueError(f"no attention projections found to put LoRA on (layers: {sorted(present)})")


def apply_adapter(base: LoadedModel, path: str | os.PathLike[str], digest: str) -> LoadedModel:
    """The base with the adapter stored in `path` applied (blocking); `base` unchanged."""
    import torch
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(shared_copy(base.model), str(path), is_trainable=False)
    torch.nn.Module.eval(peft_model)
    return LoadedModel(
        digest=base.digest,
        name=base.name,
        # the inner transformers model, LoRA layers injected: the same forward signature
        # as the base, so executors need not know an adapter is there
        model=peft_model.get_base_model(),
        tokenizer=base.tokenizer,
        task=base.task,
        adapter=digest,
        peft_model=peft_model,
    )


def adapter_files(peft_model: Any) -> dict[str, bytes]:
    """The files of a peft model's (default) adapter, as byte-stable as its weights:
    sorted keys, fixed metadata, and no field that names a local path or a library
    version (they would change the digest without changing the adapter)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save as save_safetensors

    config = peft_model.peft_config["default"].to_dict()
    for volatile in ("base_model_name_or_path", "revision", "peft_version"):
        config.pop(volatile, None)
    config["inference_mode"] = True
    state = get_peft_model_state_dict(peft_model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(state.items())}
    return {
        ADAPTER_CONFIG: (
            json.dumps(config, indent=2, sort_keys=True, default=_jsonable) + "\n"
        ).encode(),
        ADAPTER_WEIGHTS: save_safetensors(tensors, metadata={"format": "pt"}),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} into adapter_config.json")


def write_adapter(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        check_file_name(fname)
        (folder / fname).write_bytes(data)
    return folder
