"""TrainExecutor on the tiny Llama: SFT and DPO steps lower their loss, the adapter is
content (its digest follows the data and the seed, and nothing else), the resident base
is never modified, and a trained adapter generates the same wherever it is loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
# every test here trains a model for seconds: the slow tier (issue 15 item 9)
pytestmark = pytest.mark.slow

from flowmesh.topics.store.cas import CAS, FileBackend  # noqa: E402
from flowmesh.workers.executors.base import OpError, OpInput  # noqa: E402
from flowmesh.workers.executors.generate import GenerateExecutor  # noqa: E402
from flowmesh.workers.executors.train import TrainExecutor  # noqa: E402
from flowmesh.workers.models import (  # noqa: E402
    AdapterFiles,
    LoadedModel,
    ModelCache,
    build_tiny_llama,
    get_manifest,
    put_model,
    store_artifacts,
)

BLUE = [
    {"prompt": f"Question {i}: what colour is the {thing}?", "completion": " blue blue blue"}
    for i, thing in enumerate(["sky", "sea", "car", "door", "cup", "hat", "bird", "book"])
]
PAIRS = [
    {"prompt": f"Is {x} a number?", "chosen": " yes it is", "rejected": " no"}
    for x in ["one", "two", "ten", "three", "seven", "nine"]
]
SFT = {"method": "sft", "steps": 30, "lr": 0.02, "batch_size": 4, "seed": 0}
DPO = {"method": "dpo", "steps": 20, "lr": 0.01, "batch_size": 3, "beta": 0.5, "seed": 0}
PROBE = [[{"prompt": "Question 42: what colour is the sky?"}]]


class Env:
    def __init__(self, cas: CAS, cache: ModelCache, digest: str) -> None:
        self.cas, self.cache, self.digest = cas, cache, digest


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("train")
    cas = CAS(FileBackend(root / "cas"))
    digest = asyncio.run(put_model(cas, "tiny-llama", build_tiny_llama()))
    return Env(cas, ModelCache(cas, root / "models"), digest)


@pytest.fixture
async def base(env: Env) -> LoadedModel:
    return await env.cache.get(env.digest)


def train(model: Any, records: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    [outcome] = TrainExecutor().run([OpInput("k", params, [records])], model)
    assert not isinstance(outcome, OpError), outcome
    [record] = outcome
    return record


def generate(model: Any, max_new_tokens: int = 6) -> str:
    op = OpInput("g", {"max_new_tokens": max_new_tokens}, PROBE)
    [outcome] = GenerateExecutor().run([op], model)
    assert not isinstance(outcome, OpError), outcome
    text: str = outcome[0]["completion"]
    return text


def snapshot(model: LoadedModel) -> dict[str, Any]:
    return {k: (v.clone(), v.requires_grad) for k, v in model.model.named_parameters()}


async def test_sft_lowers_its_loss_and_outputs_an_adapter(env: Env, base: LoadedModel) -> None:
    before = snapshot(base)
    modules_before = [n for n, _ in base.model.named_modules()]
    record = train(base, BLUE, **SFT)
    assert record["loss_after"] < record["loss_before"] - 0.5
    assert (record["method"], record["steps"], record["examples"]) == ("sft", 30, len(BLUE))
    assert record["base"] == env.digest
    files = record["adapter"]
    assert isinstance(files, AdapterFiles) and files.base == env.digest
    assert set(files.files) == {"adapter_config.json", "adapter_model.safetensors"}

    stored = await store_artifacts(env.cas, record)
    assert stored["adapter"] == files.digest  # the digest put_adapter gives
    assert {k: v for k, v in stored.items() if k != "adapter"} == {
        k: v for k, v in record.items() if k != "adapter"
    }
    await env.cas.put_record(stored)  # a plain record now
    manifest = await get_manifest(env.cas, stored["adapter"])
    assert (manifest.task, manifest.base) == ("lora-adapter", env.digest)

    # the resident base is untouched: no LoRA layers, same weights, same grad flags
    assert [n for n, _ in base.model.named_modules()] == modules_before
    after = snapshot(base)
    assert before.keys() == after.keys()
    for k, (w, grad) in before.items():
        assert torch.equal(w, after[k][0]) and grad == after[k][1], k


async def test_dpo_lowers_its_loss(base: LoadedModel) -> None:
    record = train(base, PAIRS, **DPO)
    assert record["loss_before"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert record["loss_after"] < 0.6
    assert record["method"] == "dpo"


async def test_the_adapter_digest_is_a_function_of_data_and_seed(base: LoadedModel) -> None:
    short = {**SFT, "steps": 4}
    first = train(base, BLUE, **short)["adapter"].digest
    assert train(base, BLUE, **short)["adapter"].digest == first  # deterministic
    assert train(base, BLUE, **{**short, "seed": 1})["adapter"].digest != first
    assert train(base, BLUE[:-1], **short)["adapter"].digest != first
    changed = [{**r, "completion": " red"} for r in BLUE]
    assert train(base, changed, **short)["adapter"].digest != first


async def test_an_adapter_changes_generation_and_loads_the_same_anywhere(
    env: Env, base: LoadedModel, tmp_path: Path
) -> None:
    plain = generate(base)
    record = await store_artifacts(env.cas, train(base, BLUE, **SFT))
    adapter = record["adapter"]

    adapted = await env.cache.get(env.digest, adapter)
    assert (adapted.digest, adapted.adapter) == (env.digest, adapter)
    assert await env.cache.get(env.digest, adapter) is adapted  # resident
    assert f"{env.digest}+{adapter}" in env.cache.resident()
    text = generate(adapted)
    assert text != plain and "blue" in text
    assert generate(base) == plain  # the base still generates as before

    fresh = ModelCache(env.cas, tmp_path / "elsewhere")  # another worker, same CAS
    again = await fresh.get(env.digest, adapter)
    assert generate(again, 12) == generate(adapted, 12)
    probe = base.tokenizer("Question 7: what colour", return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(again.model(**probe).logits, adapted.model(**probe).logits)


async def test_training_continues_from_an_adapter(env: Env, base: LoadedModel) -> None:
    first = await store_artifacts(env.cas, train(base, BLUE, **{**SFT, "steps": 10}))
    adapted = await env.cache.get(env.digest, first["adapter"])
    text = generate(adapted)
    more = train(adapted, BLUE, **{**SFT, "steps": 10})
    # it starts where the first run ended, and the new adapter is again on the base
    assert more["loss_before"] == pytest.approx(first["loss_after"], rel=1e-4)
    assert more["loss_after"] < more["loss_before"]
    assert more["base"] == env.digest and more["adapter"].base == env.digest
    assert more["adapter"].digest != first["adapter"]
    assert generate(adapted) == text  # the resident adapted model is untouched


async def test_bad_train_operators_fail_alone(base: LoadedModel) -> None:
    ex = TrainExecutor()
    cases = [
        ({"method": "sft"}, [[{"prompt": "x"}]], "field 'completion' is missing"),
        ({"method": "dpo"}, [[{"prompt": "x", "chosen": "y", "rejected": 3}]], "is int"),
        ({"method": "sft"}, [[]], "no examples"),
        ({"method": "rl"}, [[{"prompt": "x", "completion": "y"}]], "bad params"),
        ({"method": "sft", "steps": 0}, [[{"prompt": "x", "completion": "y"}]], "must be"),
    ]
    for params, inputs, message in cases:
        [outcome] = ex.run([OpInput("k", params, inputs)], base)
        assert isinstance(outcome, OpError) and message in str(outcome), (params, outcome)
    [outcome] = ex.run([OpInput("k", {"method": "sft"}, [[]])], None)
    assert isinstance(outcome, OpError)


def _runtime_stores_artifacts() -> bool:
    import inspect

    from flowmesh.workers import runtime

    return "store_artifacts" in inspect.getsource(runtime)


@pytest.mark.slow
@pytest.mark.skipif(
    not _runtime_stores_artifacts(), reason="the worker runtime does not store adapters yet"
)
async def test_a_workflow_trains_then_generates_with_its_adapter(make_fabric: Any) -> None:
    from flowmesh.engine.spec import parse_spec
    from tests.conftest import connect

    fabric = make_fabric(workers=1, models=True)
    spec = parse_spec(
        {
            "name": "sft-then-generate",
            "datasets": {
                "train_set": {"records": BLUE},
                "questions": {"records": [{"prompt": p[0]["prompt"]} for p in PROBE]},
            },
            "nodes": [
                {"name": "sft", "op": "train", "model": "tiny-llama", "input": "train_set",
                 "params": SFT},
                {"name": "answers", "op": "generate", "model": "tiny-llama", "adapter": "sft",
                 "input": "questions", "params": {"max_new_tokens": 6}},
                {"name": "plain", "op": "generate", "model": "tiny-llama",
                 "input": "questions", "params": {"max_new_tokens": 6}},
            ],
        }
    )  # fmt: skip
    async with await connect(fabric, 1) as fm:
        wf = await fm.submit(spec)
        status = await fm.wait(wf, timeout=180)
        assert status.state == "completed", status.error
        [trained] = await fm.result(wf, "sft")
        [answer] = await fm.result(wf, "answers")
        [plain] = await fm.result(wf, "plain")
        manifest = await get_manifest(fm.cas, trained["adapter"])
    assert manifest.task == "lora-adapter" and manifest.base == trained["base"]
    assert trained["loss_after"] < trained["loss_before"]
    assert "blue" in answer["completion"] and answer["completion"] != plain["completion"]
