"""Models as content: a model is a manifest of file digests in the CAS.

The manifest {"name": ..., "task": ..., "files": {file name: digest}} is a CAS record;
its digest *is* the model's identity. An operator key that names a model digest therefore
names exact weights and tokenizer, and any worker can fetch them from the CAS without a
model hub. A LoRA adapter is content the same way: {"base": <model digest>, "task":
"lora-adapter", "files": {...}} (workers/models/adapters.py), so a fine-tuned policy
flows into the next step under a new digest and deduplication stays correct.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from flowmesh.topics.codec import is_digest, sha256_hex
from flowmesh.topics.store.cas import CAS, CorruptBlob

Task = Literal["causal-lm", "embedding", "lora-adapter"]
MODEL_TASKS: tuple[Task, ...] = ("causal-lm", "embedding")
ADAPTER_TASK: Task = "lora-adapter"

# plain file names only: a manifest is tenant-supplied content, and a name like
# "../../x" must never write outside the model's directory
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelManifest:
    name: str
    files: dict[str, str]  # file name -> blob digest
    # manifests written before tasks existed are causal LMs: that is all there was
    task: Task = "causal-lm"
    base: str | None = None  # adapters: the digest of the model they apply to


@dataclass(frozen=True)
class LoadedModel:
    digest: str  # the base model's digest (also for an adapted model)
    name: str
    model: Any  # transformers PreTrainedModel in eval mode (LoRA layers injected if adapted)
    tokenizer: Any  # transformers tokenizer
    task: Task = "causal-lm"
    adapter: str | None = None  # the LoRA adapter's digest applied on top, if any
    peft_model: Any = None  # the peft.PeftModel wrapping `model` when adapted

    @property
    def key(self) -> str:
        """What this loaded model is, as `resident()` reports it: the digest, or
        "<base digest>+<adapter digest>" for an adapted model."""
        return f"{self.digest}+{self.adapter}" if self.adapter else self.digest


def check_file_name(name: str) -> None:
    if not _FILE_NAME_RE.match(name):
        raise ValueError(f"bad model file name {name!r} (plain names only, no directories)")


def _check_task(task: str) -> Task:
    if task not in (*MODEL_TASKS, ADAPTER_TASK):
        raise ValueError(f"unknown model task {task!r}")
    return task


async def put_blob(cas: CAS, data: bytes) -> str:
    """cas.put without recompressing what is already stored: hashing is far cheaper than
    zstd on hundreds of MB, and every worker start re-publishes the same weights."""
    digest = await asyncio.to_thread(sha256_hex, data)
    if await cas.exists(digest):
        return digest
    stored = await cas.put(data)
    assert stored == digest
    return digest


async def put_model(cas: CAS, name: str, files: dict[str, bytes], task: Task = "causal-lm") -> str:
    """Store a model's files and its manifest; returns the model digest."""
    if not files:
        raise ValueError("a model needs at least one file")
    if _check_task(task) not in MODEL_TASKS:
        raise ValueError(f"{task!r} is not a model task (adapters: put_adapter)")
    for fname in files:
        check_file_name(fname)
    digests = {fname: await put_blob(cas, data) for fname, data in sorted(files.items())}
    return await cas.put_record({"name": name, "task": task, "files": digests})


async def put_model_dir(
    cas: CAS, name: str, folder: Path, file_names: Iterable[str], task: Task
) -> str:
    """put_model for files of a local folder, read one at a time (weights can be large)."""
    if _check_task(task) not in MODEL_TASKS:
        raise ValueError(f"{task!r} is not a model task")
    digests: dict[str, str] = {}
    for fname in sorted(set(file_names)):
        check_file_name(fname)
        data = await asyncio.to_thread((folder / fname).read_bytes)
        digests[fname] = await put_blob(cas, data)
        del data
    if not digests:
        raise ValueError(f"{folder}: no model files")
    return await cas.put_record({"name": name, "task": task, "files": digests})


async def get_manifest(cas: CAS, digest: str) -> ModelManifest:
    """A model's or an adapter's manifest, validated."""
    record = await cas.get_record(digest)
    files, task, base = record.get("files"), record.get("task", "causal-lm"), record.get("base")
    name = record.get("name", "lora-adapter" if task == ADAPTER_TASK else None)
    if (
        not isinstance(name, str)
        or not isinstance(files, dict)
        or not all(isinstance(d, str) and is_digest(d) for d in files.values())
        or task not in (*MODEL_TASKS, ADAPTER_TASK)
        or (task == ADAPTER_TASK) != (isinstance(base, str) and is_digest(base))
    ):
        raise CorruptBlob(f"{digest} is not a model or adapter manifest")
    for fname in files:
        check_file_name(fname)
    return ModelManifest(name, dict(files), cast(Task, task), base)


async def fetch_model_files(cas: CAS, digest: str, dest_dir: str | os.PathLike[str]) -> Path:
    """Materialise a model's (or an adapter's) files into dest_dir/<digest>/ and return
    that directory.

    The directory appears atomically (written under a temp name, then renamed), so its
    presence means it is complete and a second fetch, or a concurrent one in another
    process, does no work."""
    if not is_digest(digest):  # it becomes a path component
        raise ValueError(f"not a model digest: {digest!r}")
    target = Path(dest_dir) / digest
    if target.is_dir():
        return target
    manifest = await get_manifest(cas, digest)
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_dir, prefix=f".tmp-{digest[:12]}-"))
    try:
        for fname, blob in sorted(manifest.files.items()):
            # one file in memory at a time (weights can be large); write off the loop
            data = await cas.get(blob)
            await asyncio.to_thread((tmp / fname).write_bytes, data)
        install_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def install_dir(tmp: Path, target: Path) -> None:
    """Rename a fully written temp directory into place; losing the race to another
    writer of the same content is fine (theirs is complete too)."""
    try:
        tmp.rename(target)
    except OSError:
        if not target.is_dir():  # not "someone else finished first": a real error
            raise


def load_model(
    path: str | os.PathLike[str],
    digest: str,
    name: str,
    device: str = "cpu",
    task: Task = "causal-lm",
) -> LoadedModel:
    """Load a model and its tokenizer from a local directory (blocking): a causal LM, or
    for task "embedding" the bare encoder (AutoModel) whose hidden states get pooled."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if task not in MODEL_TASKS:
        raise ValueError(f"cannot load a {task!r} as a model")
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    # local_files_only: never reach for a hub. trust_remote_code=False: a manifest is
    # tenant content, and a config naming custom code must not get to run it.
    model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    st_config = Path(path) / "sentence_bert_config.json"
    if task == "embedding" and st_config.is_file():
        # sentence-transformers truncates at its own max_seq_length (256 for MiniLM), not
        # at the tokenizer's 512: embeddings of long texts only match with the same cut
        limit = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            tokenizer.model_max_length = limit
    # through nn.Module: PreTrainedModel's own .to/.eval stubs confuse mypy
    torch.nn.Module.eval(torch.nn.Module.to(model, device))
    return LoadedModel(digest=digest, name=name, model=model, tokenizer=tokenizer, task=task)


class ModelCache:
    """Keeps loaded models resident, keyed by digest; loads each at most once.

    Base models stay resident for the worker's life (a worker serves a fixed set). A
    base with an adapter is a separate, cheap entry: the adapter's LoRA layers are
    injected into a copy of the base's module tree that shares the base's weight
    tensors, so the resident base itself is never modified and each combination costs
    only its LoRA weights. Those are kept in an LRU bounded by `max_adapted`."""

    def __init__(
        self,
        cas: CAS,
        cache_dir: str | os.PathLike[str],
        device: str = "cpu",
        max_adapted: int = 8,
    ) -> None:
        if max_adapted < 1:
            raise ValueError("max_adapted must be at least 1")
        self.cas = cas
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.max_adapted = max_adapted
        self._models: dict[str, LoadedModel] = {}
        self._adapted: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, digest: str, adapter: str | None = None) -> LoadedModel:
        """The model `digest`, with the LoRA adapter `adapter` applied if given.
        Raises ValueError (or a CASError) when the digests do not name a loadable model
        and an adapter made for it."""
        base = self._models.get(digest) or await self._load_base(digest)
        if adapter is None:
            return base
        hit = self._adapted.get((digest, adapter))
        if hit is not None:
            self._adapted.move_to_end((digest, adapter))
            return hit
        return await self._load_adapted(base, adapter)

    async def _load_base(self, digest: str) -> LoadedModel:
        # concurrent requests for one model wait for a single fetch + load
        async with self._locks.setdefault(digest, asyncio.Lock()):
            loaded = self._models.get(digest)
            if loaded is None:
                manifest = await get_manifest(self.cas, digest)
                if manifest.task not in MODEL_TASKS:
                    raise ValueError(f"{digest} is a {manifest.task}, not a model")
                path = await fetch_model_files(self.cas, digest, self.cache_dir)
                loaded = await asyncio.to_thread(
                    load_model, path, digest, manifest.name, self.device, manifest.task
                )
                self._models[digest] = loaded
        return loaded

    async def _load_adapted(self, base: LoadedModel, adapter: str) -> LoadedModel:
        from flowmesh.workers.models.adapters import apply_adapter

        key = (base.digest, adapter)
        async with self._locks.setdefault(f"{base.digest}+{adapter}", asyncio.Lock()):
            loaded = self._adapted.get(key)
            if loaded is None:
                manifest = await get_manifest(self.cas, adapter)
                if manifest.task != ADAPTER_TASK:
                    raise ValueError(f"{adapter} is a {manifest.task}, not a LoRA adapter")
                if manifest.base != base.digest:
                    raise ValueError(
                        f"adapter {adapter[:12]} was trained on {str(manifest.base)[:12]}, "
                        f"not on {base.digest[:12]}"
                    )
                path = await fetch_model_files(self.cas, adapter, self.cache_dir)
                loaded = await asyncio.to_thread(apply_adapter, base, path, adapter)
                self._adapted[key] = loaded
                while len(self._adapted) > self.max_adapted:
                    self._adapted.popitem(last=False)  # least recently used
            else:
                self._adapted.move_to_end(key)
        self._locks.pop(f"{base.digest}+{adapter}", None)  # adapters come and go
        return loaded

    def resident(self) -> list[str]:
        """What is loaded now: base model digests in load order, then the adapted
        combinations as "<base digest>+<adapter digest>", least recently used first.
        The scheduler's warm-model check matches the plain base digests."""
        return [*self._models, *(f"{b}+{a}" for b, a in self._adapted)]
