"""Models as content: a model is a manifest of file digests in the CAS.

The manifest {"name": ..., "files": {file name: digest}} is a CAS record; its digest *is*
the model's identity. An operator key that names a model digest therefore names exact
weights and tokenizer, and any worker can fetch them from the CAS without a model hub.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topics.cas import CAS, CorruptBlob
from topics.codec import is_digest

# plain file names only: a manifest is tenant-supplied content, and a name like
# "../../x" must never write outside the model's directory
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelManifest:
    name: str
    files: dict[str, str]  # file name -> blob digest


@dataclass(frozen=True)
class LoadedModel:
    digest: str
    name: str
    model: Any  # transformers PreTrainedModel (causal LM), eval mode
    tokenizer: Any  # transformers tokenizer


def _check_file_name(name: str) -> None:
    if not _FILE_NAME_RE.match(name):
        raise ValueError(f"bad model file name {name!r} (plain names only, no directories)")


async def put_model(cas: CAS, name: str, files: dict[str, bytes]) -> str:
    """Store a model's files and its manifest; returns the model digest."""
    if not files:
        raise ValueError("a model needs at least one file")
    for fname in files:
        _check_file_name(fname)
    digests = {fname: await cas.put(data) for fname, data in sorted(files.items())}
    return await cas.put_record({"name": name, "files": digests})


async def get_manifest(cas: CAS, digest: str) -> ModelManifest:
    record = await cas.get_record(digest)
    name, files = record.get("name"), record.get("files")
    if (
        not isinstance(name, str)
        or not isinstance(files, dict)
        or not all(isinstance(d, str) and is_digest(d) for d in files.values())
    ):
        raise CorruptBlob(f"{digest} is not a model manifest")
    for fname in files:
        _check_file_name(fname)
    return ModelManifest(name, dict(files))


async def fetch_model_files(cas: CAS, digest: str, dest_dir: str | os.PathLike[str]) -> Path:
    """Materialise a model's files into dest_dir/<digest>/ and return that directory.

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
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not "someone else finished first": a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    path: str | os.PathLike[str], digest: str, name: str, device: str = "cpu"
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory (blocking)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only: never reach for a hub. trust_remote_code=False: a manifest is
    # tenant content, and a config naming custom code must not get to run it.
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    # through nn.Module: PreTrainedModel's own .to/.eval stubs confuse mypy
    torch.nn.Module.eval(torch.nn.Module.to(model, device))
    return LoadedModel(digest=digest, name=name, model=model, tokenizer=tokenizer)


class ModelCache:
    """Keeps loaded models resident, keyed by digest; loads each at most once."""

    def __init__(self, cas: CAS, cache_dir: str | os.PathLike[str], device: str = "cpu") -> None:
        self.cas = cas
        self.cache_dir = Path(cache_dir)
        self.device = device
        self._models: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, digest: str) -> LoadedModel:
        loaded = self._models.get(digest)
        if loaded is not None:
            return loaded
        # concurrent requests for one model wait for a single fetch + load
        async with self._locks.setdefault(digest, asyncio.Lock()):
            loaded = self._models.get(digest)
            if loaded is None:
                manifest = await get_manifest(self.cas, digest)
                path = await fetch_model_files(self.cas, digest, self.cache_dir)
                loaded = await asyncio.to_thread(
                    load_model, path, digest, manifest.name, self.device
                )
                self._models[digest] = loaded
        return loaded

    def resident(self) -> list[str]:
        """Digests of the loaded models, in load order."""
        return list(self._models)
