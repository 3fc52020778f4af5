"""Models as content: the tiny model's bytes are reproducible, and a model round-trips
through the CAS into a loadable, resident model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from topics.cas import CAS, FileBackend
from topics.codec import is_digest
from workers.models import (
    ModelCache,
    build_tiny_llama,
    fetch_model_files,
    get_manifest,
    put_model,
)

REPO = Path(__file__).resolve().parents[1]

DIGESTS_SCRIPT = """
import hashlib, json
from workers.models import build_tiny_llama
print(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in build_tiny_llama().items()}))
"""


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return build_tiny_llama()


@pytest.fixture
def cas(tmp_path: Path) -> CAS:
    return CAS(FileBackend(tmp_path / "cas"))


def test_tiny_llama_bytes_are_the_same_in_every_process(files: dict[str, bytes]) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DIGESTS_SCRIPT],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert outputs[0] == outputs[1] == digests(files) == digests(build_tiny_llama())


def test_tiny_llama_is_what_it_claims(files: dict[str, bytes]) -> None:
    import torch

    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= set(
        files
    )
    config = json.loads(files["config.json"])
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (4, 128)
    assert config["max_position_embeddings"] == 512
    assert "transformers_version" not in config  # a library upgrade must not change the digest
    state = torch.random.get_rng_state()
    build_tiny_llama()
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched


async def test_put_and_fetch_round_trip(
    cas: CAS, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = await put_model(cas, "tiny-llama", files)
    assert is_digest(digest)
    assert digest == await put_model(cas, "tiny-llama", dict(reversed(files.items())))
    assert digest != await put_model(cas, "another-name", files)  # the name is content too

    manifest = await cas.get_record(digest)
    assert manifest == {"name": "tiny-llama", "files": digests(files)}
    assert (await get_manifest(cas, digest)).name == "tiny-llama"

    path = await fetch_model_files(cas, digest, tmp_path / "models")
    assert path == tmp_path / "models" / digest
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert [p.name for p in (tmp_path / "models").iterdir()] == [digest]  # no temp dirs left

    async def no_reads(_: str) -> bytes:
        raise AssertionError("a present model must not be fetched again")

    monkeypatch.setattr(cas, "get", no_reads)
    assert await fetch_model_files(cas, digest, tmp_path / "models") == path


async def test_bad_file_names_are_refused(cas: CAS, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad model file name"):
        await put_model(cas, "evil", {"../escape.txt": b"x"})
    blob = await cas.put(b"x")
    evil = await cas.put_record({"name": "evil", "files": {"../escape.txt": blob}})
    with pytest.raises(ValueError, match="bad model file name"):
        await fetch_model_files(cas, evil, tmp_path / "models")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(ValueError, match="not a model digest"):
        await fetch_model_files(cas, "../" + "0" * 61, tmp_path / "models")


async def test_model_cache_loads_once_and_stays_resident(
    cas: CAS, files: dict[str, bytes], tmp_path: Path
) -> None:
    import torch

    digest = await put_model(cas, "tiny-llama", files)
    cache = ModelCache(cas, tmp_path / "models")
    assert cache.resident() == []
    first, second = await asyncio.gather(cache.get(digest), cache.get(digest))
    assert first is second and await cache.get(digest) is first
    assert cache.resident() == [digest]
    assert (first.digest, first.name) == (digest, "tiny-llama")
    assert not first.model.training
    assert first.tokenizer.padding_side == "left"
    assert first.tokenizer.pad_token == "<pad>" and first.tokenizer.eos_token == "</s>"
    enc = first.tokenizer("hello world", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == first.tokenizer.bos_token_id
    with torch.inference_mode():
        logits = first.model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 512)
    assert logits.dtype == torch.float32
