"""`ray`: the same pipeline as Ray tasks on a local Ray, the stack verl/OpenRLHF users
run today.

Each workflow runs its DAG node by node; a record-level node becomes one Ray task per
chunk of at most the executor's batch limit (the same cap the fabric's scheduler uses),
a dataset-level node one task. Every task calls the very executor code FlowMesh workers
run (workers/executors) with the same canonical params and the same model source, so
the work per operator is identical; what Ray does not have is dedup across workflows or
batching across them. `ray.init(num_cpus=workers)`: as many one-CPU task slots as the
fabric has worker processes.

Worker-seconds are the time spent inside the executor (what fabric workers bill too),
priced at the default CPU worker's $/h and watts (workers.runtime.WorkerConfig).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from flowmesh.engine.spec import topo_order
from flowmesh.loadgen.real.results import ModeResult, Progress, WorkflowResult, no_progress
from flowmesh.loadgen.real.workload import RealWorkload, Submission
from flowmesh.topics import codec
from flowmesh.topics.operators import KINDS, executor_id, parse_params
from flowmesh.topics.store.cas import open_cas
from flowmesh.workers.executors import Executor, OpError, OpInput, Record, builtin_executors
from flowmesh.workers.runtime import WorkerConfig

# per Ray worker process: executors and loaded models, like a fabric worker keeps them
_EXECUTORS: dict[str, Executor] = {}
_MODELS: dict[str, Any] = {}


def _executors() -> dict[str, Executor]:
    if not _EXECUTORS:
        # the no-op transform too, for the overhead benchmark's Ray side
        _EXECUTORS.update(builtin_executors(["flowmesh.loadgen.real.noop"], generate_backend="hf"))
    return _EXECUTORS


def _model(source: str) -> Any:
    """Load a model source the way a worker does: publish it into a (private) CAS,
    then load it through the worker's ModelCache."""
    if source not in _MODELS:
        from flowmesh.workers.models import ModelCache, publish_source

        async def load() -> Any:
            tmp = Path(tempfile.mkdtemp(prefix="fm-ray-"))
            cas = await open_cas(f"file://{tmp / 'cas'}")
            _, digest = await publish_source(cas, source, tmp / "models")
            return await ModelCache(cas, tmp / "models").get(digest)

        _MODELS[source] = asyncio.run(load())
    return _MODELS[source]


def warm(model_source: str | None) -> int:
    """Import the executors and load the model before the clock starts (fabric workers
    do the same before they register)."""
    _executors()
    if model_source:
        _model(model_source)
    return 1


def stage(
    ex_id: str, params: dict[str, Any], model_source: str | None, ops: list[list[list[Record]]]
) -> tuple[list[list[Record]], float]:
    """Run one batch of operators (each a list of input slots); their outputs, and the
    seconds spent in the executor."""
    ex = _executors()[ex_id]
    model = _model(model_source) if model_source else None
    batch = [OpInput(key=f"op{i}", params=params, inputs=slots) for i, slots in enumerate(ops)]
    t = time.perf_counter()
    outcomes = ex.run(batch, model)
    busy = time.perf_counter() - t
    out: list[list[Record]] = []
    for o in outcomes:
        if isinstance(o, OpError):
            raise RuntimeError(f"{ex_id}: {o}")
        out.append(o)
    return out, busy


def noop_task(record: Record) -> Record:
    """One fine-grained no-op operator through the same transform executor (overhead)."""
    ex = _executors()["map.bench.noop"]
    (outcome,) = ex.run([OpInput(key="op", params={}, inputs=[[record]])], None)
    if isinstance(outcome, OpError):
        raise RuntimeError(str(outcome))
    return outcome[0]


def ray_init(num_cpus: int) -> None:
    import ray

    # no dashboard, no driver log forwarding: the benchmark's own output only; a small
    # object store, as records are tiny
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=128 * 1024 * 1024,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )


async def run_ray_mode(
    wl: RealWorkload, progress: Progress = no_progress, timeout_s: float = 1800.0
) -> ModeResult:
    import ray

    t_setup = time.monotonic()
    ray_init(wl.workers)
    try:
        remote_stage = ray.remote(num_cpus=1)(stage)
        remote_warm = ray.remote(num_cpus=1)(warm)
        await asyncio.gather(*(remote_warm.remote(wl.model) for _ in range(wl.workers)))
        setup_s = time.monotonic() - t_setup
        caps = {ex.id: ex.max_batch for ex in _executors().values()}
        total = len(wl.submissions)
        done: list[WorkflowResult] = []
        busy: dict[str, float] = {}
        ops: dict[str, int] = {}

        async def one(sub: Submission) -> WorkflowResult:
            spec = sub.spec
            outputs: dict[str, list[Record]] = {
                name: list(ds.records or []) for name, ds in spec.datasets.items()
            }
            nodes = {n.name: n for n in spec.nodes}
            busy[sub.workflow_id] = 0.0
            ops[sub.workflow_id] = 0
            submitted = time.time()
            for name in topo_order(spec):
                node = nodes[name]
                kind = KINDS[node.op]
                ex_id = executor_id(kind.name, node.fn)
                parsed = parse_params(kind, node.params)
                params = parsed if isinstance(parsed, dict) else codec.to_builtins(parsed)
                src = wl.model if node.model else None
                if kind.fanout == "record":
                    recs = outputs[node.inputs[0]]
                    cap = max(1, caps.get(ex_id, 1))
                    chunks = [recs[i : i + cap] for i in range(0, len(recs), cap)]
                    refs = [
                        remote_stage.remote(ex_id, params, src, [[[r]] for r in c]) for c in chunks
                    ]
                    results = await asyncio.gather(*refs)
                    ops[sub.workflow_id] += len(recs)
                else:
                    slots = [[outputs[i] for i in node.inputs]]
                    results = [await remote_stage.remote(ex_id, params, src, slots)]
                    ops[sub.workflow_id] += 1
                outputs[name] = [r for outs, _ in results for op_out in outs for r in op_out]
                busy[sub.workflow_id] += sum(b for _, b in results)
            return WorkflowResult(
                sub.workflow_id, sub.tenant, sub.at_s, "completed", time.time() - submitted
            )

        async def guarded(sub: Submission) -> None:
            try:
                wr = await asyncio.wait_for(one(sub), timeout_s)
            except Exception as exc:  # one workflow's failure is a result, not a crash
                state = "timeout" if isinstance(exc, TimeoutError) else "failed"
                wr = WorkflowResult(
                    sub.workflow_id, sub.tenant, sub.at_s, state, None, error=str(exc)
                )
            cfg = WorkerConfig()
            wr.device_seconds = busy.get(sub.workflow_id, 0.0)
            wr.usd = wr.device_seconds * cfg.price_per_hour / 3600.0
            wr.energy_j = wr.device_seconds * cfg.watts
            done.append(wr)
            progress("ray", len(done), total)

        progress("ray", 0, total)
        t0 = time.monotonic()
        tasks = []
        for sub in wl.submissions:
            await asyncio.sleep(max(0.0, t0 + sub.at_s - time.monotonic()))
            tasks.append(asyncio.create_task(guarded(sub)))
        await asyncio.gather(*tasks)
        makespan = time.monotonic() - t0
    finally:
        ray.shutdown()
    by_id = {w.workflow_id: w for w in done}
    workflows = [by_id[s.workflow_id] for s in wl.submissions]
    n_ops = sum(ops.values())
    return ModeResult(
        mode="ray",
        workers=wl.workers,
        workflows=workflows,
        ops_requested=n_ops,
        ops_executed=n_ops,
        worker_seconds=sum(w.device_seconds for w in workflows),
        usd=sum(w.usd for w in workflows),
        energy_j=sum(w.energy_j for w in workflows),
        makespan_s=makespan,
        setup_s=setup_s,
        notes=f"ray.init(num_cpus={wl.workers}); one task per node chunk, no dedup",
    )
