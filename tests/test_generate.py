"""GenerateExecutor on the tiny random Llama: a record's completion depends only on the
record, its params and the model, never on the batch it happened to share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from topics.operators import GenerateParams  # noqa: E402
from workers.executors.base import OpError, OpInput, Outcome  # noqa: E402
from workers.executors.generate import GenerateExecutor, decode_ids, row_seed  # noqa: E402
from workers.models import LoadedModel, build_tiny_llama, load_model  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "a",
    "",  # just <s>: the longest padding in the batch
    "What is the capital of France? Paris is the capital of",
    "Data flows through the pipeline",
    "héllo wörld 🙂",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    for name, data in build_tiny_llama().items():
        (path / name).write_bytes(data)
    return load_model(path, digest="0" * 64, name="tiny-llama")


def ops(prompts: list[str], **params: Any) -> list[OpInput]:
    return [
        OpInput(key=f"k{i}", params=params, inputs=[[{"id": i, "prompt": p}]])
        for i, p in enumerate(prompts)
    ]


def one_at_a_time(ex: GenerateExecutor, batch: list[OpInput], model: Any) -> list[Outcome]:
    return [ex.run([op], model)[0] for op in batch]


def completions(outcomes: list[Outcome]) -> list[str]:
    texts = []
    for o in outcomes:
        assert not isinstance(o, OpError), o
        texts.append(o[0]["completion"])
    return texts


def test_greedy_batched_equals_unbatched(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    batch = ops(PROMPTS, max_new_tokens=16)
    together = ex.run(batch, tiny)
    assert together == one_at_a_time(ex, batch, tiny)
    assert together == ex.run(batch[::-1], tiny)[::-1]  # order in the batch is irrelevant
    for op, out in zip(batch, together, strict=True):
        assert not isinstance(out, OpError)
        (record,) = out
        assert record == {**op.inputs[0][0], "completion": record["completion"]}
    assert any(completions(together))


def test_greedy_matches_transformers_generate(tiny: LoadedModel) -> None:
    """Our loop computes what HF's reference implementation computes, prompt by prompt."""
    ex = GenerateExecutor()
    ours = completions(ex.run(ops(PROMPTS, max_new_tokens=12), tiny))
    tok, lm = tiny.tokenizer, tiny.model
    for prompt, text in zip(PROMPTS, ours, strict=True):
        enc = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            full = lm.generate(
                **enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id
            )
        new = full[0, enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert text == tok.decode(new, skip_special_tokens=True)


def test_params_name_fields_and_bound_length(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    op = OpInput(
        "k", {"prompt_field": "q", "output_field": "a", "max_new_tokens": 1}, [[{"q": "a"}]]
    )
    (out,) = ex.run([op], tiny)
    assert not isinstance(out, OpError)
    enc = tiny.tokenizer("a", return_tensors="pt")
    with torch.inference_mode():
        first = int(tiny.model(**enc).logits[0, -1].argmax())
    assert out == [{"q": "a", "a": tiny.tokenizer.decode([first], skip_special_tokens=True)}]

    prompts = [tiny.tokenizer(p)["input_ids"] for p in PROMPTS]
    ids = decode_ids(tiny, GenerateParams(max_new_tokens=3), prompts, [0] * len(prompts))
    assert all(len(row) <= 3 for row in ids)


def test_stops_at_eos_per_row(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [tiny.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    params = GenerateParams(max_new_tokens=10)
    free = decode_ids(tiny, params, prompts, [0, 0, 0])
    stop = free[0][4]  # pretend the 5th token row 0 generates is an end-of-sequence token
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", [2, stop])
    stopped = decode_ids(tiny, params, prompts, [0, 0, 0])
    for before, after in zip(free, stopped, strict=True):
        assert after == (before[: before.index(stop)] if stop in before else before)
    assert len(stopped[0]) <= 4


SAMPLE = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16}


def test_same_seed_same_sample_different_seed_different(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    a = completions(ex.run(ops(PROMPTS, seed=1, **SAMPLE), tiny))
    b = completions(ex.run(ops(PROMPTS, seed=1, **SAMPLE), tiny))
    c = completions(ex.run(ops(PROMPTS, seed=2, **SAMPLE), tiny))
    greedy = completions(ex.run(ops(PROMPTS, max_new_tokens=16), tiny))
    assert a == b
    assert a != c and sum(x != y for x, y in zip(a, c, strict=True)) >= len(PROMPTS) - 1
    assert a != greedy


def test_sampling_is_independent_of_batch_composition(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    batch = ops(PROMPTS, seed=7, **SAMPLE)
    full = ex.run(batch, tiny)
    assert full == one_at_a_time(ex, batch, tiny)
    assert ex.run(batch[::-1], tiny)[::-1] == full
    assert ex.run(batch[1:4], tiny) == full[1:4]


def test_the_seed_covers_the_whole_record(tiny: LoadedModel) -> None:
    """Two records with the same prompt are different work: different draws."""
    ex = GenerateExecutor()
    twins = [OpInput(f"k{i}", dict(SAMPLE), [[{"id": i, "prompt": "The cat"}]]) for i in range(2)]
    a, b = completions(ex.run(twins, tiny))
    assert a != b
    assert row_seed(0, {"a": 1, "b": 2}) == row_seed(0, {"b": 2, "a": 1})  # canonical JSON
    assert row_seed(0, {"a": 1}) != row_seed(1, {"a": 1})


def test_tiny_top_p_is_greedy(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    greedy = ex.run(ops(PROMPTS, max_new_tokens=8), tiny)
    nucleus_of_one = ex.run(ops(PROMPTS, max_new_tokens=8, temperature=0.7, top_p=1e-9), tiny)
    assert nucleus_of_one == greedy


def test_bad_operators_fail_alone(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    good = ops(["The quick brown fox"], max_new_tokens=6)[0]
    batch = [
        good,
        OpInput("missing", {"max_new_tokens": 6}, [[{"text": "no prompt field"}]]),
        OpInput("number", {"max_new_tokens": 6}, [[{"prompt": 42}]]),
        OpInput("params", {"max_new_tokens": 6, "temperature": -1}, [[{"prompt": "x"}]]),
        OpInput("unknown", {"max_new_tokens": 6, "beams": 4}, [[{"prompt": "x"}]]),
        OpInput("too-long", {"max_new_tokens": 4096}, [[{"prompt": "x"}]]),
        OpInput("two", {"max_new_tokens": 6}, [[{"prompt": "a"}, {"prompt": "b"}]]),
    ]
    outcomes = ex.run(batch, tiny)
    assert outcomes[0] == ex.run([good], tiny)[0]
    errors = outcomes[1:]
    assert all(isinstance(e, OpError) for e in errors), errors
    messages = [str(e) for e in errors]
    assert "'prompt' is missing" in messages[0]
    assert "int, expected str" in messages[1]
    assert "temperature" in messages[2]
    assert "beams" in messages[3]
    assert "positions" in messages[4]
    assert "one input record" in messages[5]
    (no_model,) = ex.run([good], None)
    assert isinstance(no_model, OpError)


def test_mixed_params_in_one_batch_each_get_their_own(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    short = ops(PROMPTS[:2], max_new_tokens=2)
    long = ops(PROMPTS[:2], max_new_tokens=8)
    assert ex.run(short + long, tiny) == ex.run(short, tiny) + ex.run(long, tiny)


def test_version_and_identity() -> None:
    ex = GenerateExecutor()
    assert (ex.id, ex.kind, ex.max_batch) == ("generate", "generate", 16)
    assert ex.version.startswith("1+") and len(ex.version) == 14
