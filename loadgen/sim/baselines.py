"""Baselines a competent user would run instead of FlowMesh (issue 14), beside
`shared-fifo` and `isolated-dedicated` (loadgen/sim/policies.py):

- `isolated-lean`: every workflow alone, on right-sized workers of the one GPU class
  cheapest for it that meets its deadline (all classes when it has none): its GPU
  models packed by memory onto as few GPUs as hold them (one GPU per round when they
  fit), one CPU worker for CPU kinds; a worker is allocated when the workflow first has
  work for it (cold start billed) and released at once when the workflow has none left
  for it (scale to zero); model loads happen on the worker and are billed as its time.
  Batching within the workflow, oldest batch key first, up to the class's max batch.
- `reference`: the FlowMesh authors' published dispatcher (mlsys-io/FlowMesh,
  src/server/dispatcher/base.py and worker_selector.py, read for this model): tasks
  first come first served; among the idle workers that can run a task, those with its
  model cached are preferred; among them the best of
  lambda * minmax(throughput) - (1 - lambda) * minmax($/h) + min(age, 300 s) * 1e-4,
  lambda 0.4 for inference, 0.8 for training, 0.5 otherwise, where throughput is their
  hardware score (100 per GPU + GPU memory GB + system memory GB / 2); compatible
  sibling tasks (same model and params, inference kinds) are merged onto the chosen
  worker afterwards, at most 4 tasks in all. A task here is what one workflow has ready
  of one stage (their tasks are whole workflow nodes); a merged task runs on its worker
  in batches of the class's max batch, one after the other. No content dedup. The
  elastic pool and its billing are shared-fifo's; a new worker's class is the one the
  same score picks among the classes with a free slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flowmesh.engine.scheduler.fleet import DeviceClass, Fleet
from flowmesh.engine.scheduler.groups import ReadyItem
from flowmesh.loadgen.sim.autoscale import allowance
from flowmesh.loadgen.sim.policies import SimPolicy
from flowmesh.loadgen.sim.pool import SimWorker, can_run, ensure_resident
from flowmesh.loadgen.sim.readyq import Exec, ReadyQueue

if TYPE_CHECKING:
    from flowmesh.loadgen.sim.simulator import Simulation
    from flowmesh.loadgen.sim.workload import Stage, WorkflowRun

INFERENCE = frozenset({"generate", "score", "embed"})
TRAINING = frozenset({"train"})
MERGE_MAX = 4  # the authors' task_merge_max_batch_size


# --- isolated-lean ------------------------------------------------------------------


@dataclass
class _Plan:
    """One workflow's workers and how much work each still has to do."""

    workers: dict[str, SimWorker] = field(default_factory=dict)  # serve key -> worker
    serve: dict[str, str] = field(default_factory=dict)  # batch key -> serve key
    left: dict[str, int] = field(default_factory=dict)  # serve key -> ops not yet done


def pack_models(models: dict[str, float], memory_gb: float) -> list[list[str]]:
    """First-fit decreasing: the models (GB each) on as few devices of `memory_gb` as
    hold them all."""
    bins: list[tuple[float, list[str]]] = []
    for m, gb in sorted(models.items(), key=lambda kv: (-kv[1], kv[0])):
        for i, (used, names) in enumerate(bins):
            if used + gb <= memory_gb:
                bins[i] = (used + gb, [*names, m])
                break
        else:
            bins.append((gb, [m]))
    return [names for _, names in bins]


def stage_seconds(sim: Simulation, st: Stage, dev: DeviceClass) -> float:
    """A stage's operators on `dev` at full batches (the model-size factor applied)."""
    m = dev.latency[st.kind]
    n = len(st.ops)
    batches = -(-n // max(m.max_batch, 1))
    return (batches * m.fixed_s + n * m.per_item_s) * sim.emu.size_factor(st.kind, st.model_gb, dev)


class IsolatedLeanPolicy(SimPolicy):
    name = "isolated-lean"
    shared = False

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.plans: dict[str, _Plan] = {}
        self.choice: dict[str, str] = {}  # workflow -> GPU class (reported)

    def scope(self, run: WorkflowRun) -> str:
        return run.wid

    def _gpu_class(self, sim: Simulation, run: WorkflowRun, gpu: list[Stage]) -> str:
        """The GPU class with the lowest estimated bill (work, loads, cold starts) for
        the workflow whose estimated time meets its deadline; the fastest if none does."""
        best: tuple[float, float, str] | None = None
        fastest: tuple[float, str] | None = None
        models = {st.model: st.model_gb for st in gpu if st.model}
        for name, dev in self.fleet.classes.items():
            if dev.kind != "gpu" or not all(can_run(dev, s.kind, s.model_gb) for s in gpu):
                continue
            n_gpus = max(1, len(pack_models(models, dev.memory_gb)))
            work = sum(stage_seconds(sim, st, dev) for st in gpu)
            loads = sum(gb / max(dev.load_gbps, 1e-9) for gb in models.values())
            cold = sim.settings.cold_start_s
            seconds = work + loads + cold
            cost = (work + loads + n_gpus * cold) * dev.price_per_hour / 3600
            if fastest is None or seconds < fastest[0]:
                fastest = (seconds, name)
            if run.deadline_s is not None and seconds > run.deadline_s:
                continue
            if best is None or (cost, seconds) < best[:2]:
                best = (cost, seconds, name)
        if best is not None:
            return best[2]
        if fastest is None:
            raise ValueError(f"isolated-lean: no GPU class runs all of {run.wid}'s stages")
        return fastest[1]

    def on_arrival(self, sim: Simulation, run: WorkflowRun, now: float) -> None:
        plan = _Plan()
        gpu = [st for st in run.stages if sim.kind_pool[st.kind] == "gpu"]
        cpu = [st for st in run.stages if sim.kind_pool[st.kind] == "cpu"]
        if gpu:
            cls = self._gpu_class(sim, run, gpu)
            self.choice[run.wid] = cls
            dev = self.fleet.classes[cls]
            models = {st.model: st.model_gb for st in gpu if st.model}
            bins = pack_models(models, dev.memory_gb) or [[]]
            on = {m: i for i, names in enumerate(bins) for m in names}
            for i in range(len(bins)):
                key = f"gpu{i}"
                plan.workers[key] = SimWorker(f"{run.wid}/{key}", dev, run.wid, key)
            for st in gpu:
                plan.serve[st.batch_key] = f"gpu{on.get(st.model or '', 0)}"
        if cpu:
            cls = next(n for n, c in self.fleet.classes.items() if c.kind == "cpu")
            dev = self.fleet.classes[cls]
            plan.workers["cpu"] = SimWorker(f"{run.wid}/cpu", dev, run.wid, "cpu")
            for st in cpu:
                plan.serve[st.batch_key] = "cpu"
        for st in run.stages:
            key = plan.serve[st.batch_key]
            plan.left[key] = plan.left.get(key, 0) + len(st.ops)
        for w in plan.workers.values():
            sim.pool.add(w)
        self.plans[run.wid] = plan

    def on_batch_done(self, sim: Simulation, w: SimWorker, execs: list[Exec]) -> None:
        plan = self.plans.get(w.owner)
        if plan is None:
            return
        plan.left[w.serves] -= len(execs)
        if plan.left[w.serves] <= 0:  # scale to zero: nothing left for it
            sim.pool.release(w, sim.clock.now)

    def on_workflow_done(self, sim: Simulation, run: WorkflowRun, now: float) -> None:
        plan = self.plans.pop(run.wid, None)
        for w in plan.workers.values() if plan else ():
            sim.pool.release(w, now)

    def round(self, sim: Simulation, now: float, scopes: list[str]) -> None:
        for scope in scopes:
            plan = self.plans.get(scope)
            q = sim.queues.get(scope)
            if plan is None or q is None or not q.total:
                continue
            for bk in q.oldest():
                if bk not in q.sizes:
                    continue
                w = plan.workers[plan.serve[bk]]
                if not w.allocated:
                    if not w.available:  # preempted: its slot comes back later
                        continue
                    sim.allocate(w, now)
                if w.batch is not None:
                    continue
                head = q.head(bk).item
                n = min(q.sizes[bk], w.device.latency[head.kind].max_batch)
                load = ensure_resident(w, head.model, head.model_gb)
                sim.start_batch(w, q.first(bk, n), q, now, load)


# --- reference ----------------------------------------------------------------------


def hardware_score(dev: DeviceClass) -> float:
    """The authors' worker throughput proxy: 100 per GPU + GPU memory (GB), or for a
    CPU worker system memory / 2 (GB)."""
    return 100.0 + dev.memory_gb if dev.kind == "gpu" else dev.memory_gb / 2


def lam(kind: str) -> float:
    return 0.4 if kind in INFERENCE else 0.8 if kind in TRAINING else 0.5


def best_fit(devs: Sequence[DeviceClass], kind: str, age_s: float) -> int:
    """Index of the best of `devs` by the authors' best-fit score (ties: first)."""
    tps = [hardware_score(d) for d in devs]
    costs = [d.price_per_hour for d in devs]
    t_lo, t_rng = min(tps), max(tps) - min(tps)
    c_lo, c_rng = min(costs), max(costs) - min(costs)
    lm = lam(kind)
    best, best_i = -float("inf"), 0
    for i in range(len(devs)):
        nt = 0.0 if t_rng <= 0 else (tps[i] - t_lo) / t_rng
        nc = 0.0 if c_rng <= 0 else (costs[i] - c_lo) / c_rng
        s = lm * nt - (1 - lm) * nc + min(age_s, 300.0) * 1e-4
        if s > best:
            best, best_i = s, i
    return best_i


class ReferencePolicy(SimPolicy):
    name = "reference"

    def __init__(self) -> None:
        self.jobs: dict[str, ReadyQueue] = {}  # worker -> the rest of its merged task

    def _tasks(self, sim: Simulation) -> list[tuple[float, str, str]]:
        """Ready tasks (a workflow's ready operators of one stage), oldest first:
        (ready_at of the oldest, batch key, workflow)."""
        q = sim.queue
        seen: dict[tuple[str, str], float] = {}
        for bk in list(q.groups):
            if bk not in q.sizes:
                continue
            for e in q.first(bk, q.sizes[bk]):
                k = (bk, e.item.workflow_id)
                if k not in seen or e.item.ready_at < seen[k]:
                    seen[k] = e.item.ready_at
        return sorted((at, bk, wf) for (bk, wf), at in seen.items())

    def _continue_jobs(self, sim: Simulation, now: float) -> None:
        for wid, jq in list(self.jobs.items()):
            w = next((x for x in sim.pool.workers if x.id == wid), None)
            if w is None or not jq.total:
                self.jobs.pop(wid, None)
                continue
            if not w.allocated:  # preempted: the rest of its task goes back in line
                for bk in list(jq.groups):
                    for e in jq.first(bk, jq.sizes.get(bk, 0)):
                        jq.take(e)
                        sim.queue.push(e, front=True)
                self.jobs.pop(wid)
                sim.dirty[""] = None
                continue
            if w.batch is None:
                self._next_chunk(sim, w, jq, now)

    def _next_chunk(self, sim: Simulation, w: SimWorker, jq: ReadyQueue, now: float) -> None:
        bk = next(iter(jq.sizes))
        head = jq.head(bk).item
        n = min(jq.sizes[bk], w.device.latency[head.kind].max_batch)
        load = ensure_resident(w, head.model, head.model_gb)
        sim.start_batch(w, jq.first(bk, n), jq, now, load)
        if not jq.total:
            self.jobs.pop(w.id, None)

    def round(self, sim: Simulation, now: float, scopes: list[str]) -> None:
        self._continue_jobs(sim, now)
        q = sim.queue
        if not q.total:
            return
        allow: dict[str, int] | None = None
        for at, bk, wf in self._tasks(sim):
            if bk not in q.sizes:
                continue
            execs = [e for e in q.first(bk, q.sizes[bk]) if e.item.workflow_id == wf]
            if not execs:
                continue
            it = execs[0].item
            w = self._pick_free(sim, it, now - at)
            if w is None:
                if allow is None:
                    allow = allowance(sim)
                w = self._pick_new(sim, it, now - at, allow)
                if w is None:
                    continue
                allow[w.pool] -= 1
                sim.allocate(w, now)
            if it.kind in INFERENCE:  # merge sibling tasks: same model and params
                siblings: dict[str, list[Exec]] = {}
                for e in q.first(bk, q.sizes[bk]):
                    if e.item.workflow_id != wf:
                        siblings.setdefault(e.item.workflow_id, []).append(e)
                for group in list(siblings.values())[: MERGE_MAX - 1]:
                    execs.extend(group)
            jq = ReadyQueue()
            for e in execs:
                q.take(e)
                jq.push(e)
            self.jobs[w.id] = jq
            self._next_chunk(sim, w, jq, now)

    def _pick_free(self, sim: Simulation, it: ReadyItem, age_s: float) -> SimWorker | None:
        kind, model, gb = it.kind, it.model, it.model_gb
        pool = sim.kind_pool[kind]
        fits = [
            w
            for w in sim.pool.free.values()
            if w.pool == pool and w.id not in self.jobs and can_run(w.device, kind, gb)
        ]
        if not fits:
            return None
        cached = [w for w in fits if model and model in w.resident]
        cands = cached or fits
        return cands[best_fit([w.device for w in cands], kind, age_s)]

    def _pick_new(
        self, sim: Simulation, it: ReadyItem, age_s: float, allow: dict[str, int]
    ) -> SimWorker | None:
        kind, gb = it.kind, it.model_gb
        pool = sim.kind_pool[kind]
        if allow.get(pool, 0) <= 0:
            return None
        options = [
            (cls, next(iter(ws.values())))
            for cls, ws in sim.pool.unalloc.items()
            if ws
            and sim.fleet.classes[cls].kind == pool
            and can_run(sim.fleet.classes[cls], kind, gb)
        ]
        if not options:
            return None
        return options[best_fit([w.device for _, w in options], kind, age_s)][1]
