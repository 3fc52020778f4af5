"""Lineage of results: the graph of operators that produced a workflow's output.

For every operator a workflow used, `build_lineage` gathers what FlowMesh recorded about
it: its key, kind, executor and version, params, model, input digests, output manifest and
records, the worker and device class that ran it, start/end, attempts, batch size, cost,
and every workflow/tenant that requested it (KV `fm_requests`, with role ran, joined or
reused). It then links each operator's inputs to the operators of the upstream node that
produced them, down to the source datasets:

* record-fanout operators (map, filter, tokenize, generate) take one record digest; it is
  linked to the upstream node's operators whose output contains that digest, or to the
  source dataset whose record manifest contains it (``dataset:<name>``);
* whole-dataset operators (group, join) take a node's output manifest; they are linked to
  every operator of that node (or to the dataset).

Which node feeds which comes from the workflow's submission (stream FM_SUBMIT, found by
its submission time); when that message has aged out, the edges are inferred from the
digests (`NodeLineage.inputs_inferred`).

Where the record is incomplete the graph says so instead of failing: an operator whose KV
entry is gone (an invalidated cache entry) has state ``invalidated`` (its inputs are
recovered from its slot when possible); a running workflow shows the operators of its
completed nodes only (`WorkflowLineage.partial`); a failed workflow also shows the
finished operators of the nodes it did not complete, the failed one among them.

`openlineage_events` turns the graph into OpenLineage 2-0-2 RunEvents: one START and
one COMPLETE (or FAIL) per finished operator, and a START plus COMPLETE/FAIL for the
workflow, which is every operator's parent run. `flowmesh lineage WF [NODE]` prints the
graph (`--json` the whole graph, `--openlineage FILE` the events as one JSON list).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import click
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flowmesh.engine.cli_options import (
    _run,
    cas_option,
    client_cas,
    data_option,
    nats_option,
)
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.cas import CAS, CASError
from flowmesh.topics.messages import (
    NodeSpec,
    NodeStatus,
    OpRequest,
    OpState,
    SubmitWorkflow,
    WorkflowSpec,
    WorkflowStatus,
)
from flowmesh.topics.operators import KINDS

DATASET_PREFIX = "dataset:"
OpLineageState = Literal["pending", "done", "failed", "invalidated"]

PRODUCER = "https://github.com/flowmesh/flowmesh"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
PARENT_FACET_SCHEMA = (
    "https://openlineage.io/spec/facets/1-0-1/ParentRunFacet.json#/$defs/ParentRunFacet"
)
ERROR_FACET_SCHEMA = (
    "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet"
)
FLOWMESH_FACET_SCHEMA = (
    "https://github.com/flowmesh/flowmesh/blob/main/docs/openlineage/FlowMeshRunFacet.json"
)
OL_JOB_NAMESPACE = "flowmesh"
OL_DATASET_NAMESPACE = "flowmesh-cas"
# uuid5 namespaces: an operator's (and a workflow's) runId is the same in every export
_OP_RUN_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/flowmesh/flowmesh/op")
_WF_RUN_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/flowmesh/flowmesh/workflow")

CONCURRENCY = 64  # KV/CAS reads in flight at once
REQUEST_CHUNK = 200  # operator keys per fm_requests consumer (its filter subjects)
SUBMIT_SKEW_S = 300.0  # client/server clock skew tolerated when finding the submission
SUBMIT_SCAN_MAX = 20_000  # submissions read at most while looking for one


class LineageError(RuntimeError):
    """No such workflow or node."""


class HasBusAndCas(Protocol):
    """A FlowMesh client, or anything else holding a bus and a CAS."""

    @property
    def bus(self) -> Bus: ...

    @property
    def cas(self) -> CAS: ...


# --- the graph -------------------------------------------------------------------------


@dataclass
class OpLineage:
    key: str
    node: str  # the (first) node of this workflow that used it
    state: OpLineageState
    kind: str = ""
    executor: str = ""
    version: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # model weights digest
    # record fanout: the input record digests; all: one output manifest per input node
    inputs: list[str] = field(default_factory=list)
    output: str | None = None  # manifest digest of its output records
    outputs: list[str] = field(default_factory=list)  # its output record digests
    n_outputs: int = 0
    error: str | None = None
    worker: str = ""
    device_class: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    attempts: int = 0
    batch_size: int = 0
    device_seconds: float = 0.0
    cost_usd: float = 0.0
    energy_j: float = 0.0
    created_by: str = ""  # workflow whose request created the operator
    created_at: float = 0.0
    requests: list[OpRequest] = field(default_factory=list)  # every workflow that asked
    upstream: list[str] = field(default_factory=list)  # op keys and "dataset:<name>"

    @property
    def shared(self) -> bool:
        return len({r.workflow_id for r in self.requests}) > 1


@dataclass
class DatasetLineage:
    name: str
    manifest: str  # manifest of its record digests
    table: str | None  # the Arrow table digest that was submitted
    records: list[str]
    readable: bool = True  # False when the manifest is no longer in the CAS


@dataclass
class NodeLineage:
    name: str
    kind: str
    executor: str
    params: dict[str, Any]
    inputs: list[str]  # upstream node and dataset names, in the spec's order
    inputs_inferred: bool  # edges inferred from digests (the submission aged out)
    complete: bool
    total: int
    done: int
    failed: int
    reused: int
    output: str | None  # manifest of the node's ordered output records
    n_outputs: int
    ops: list[str]  # operator keys in slot order (each once)
    model: str | None = None
    note: str | None = None  # why its ops are missing or partial


@dataclass
class WorkflowLineage:
    workflow_id: str
    name: str
    tenant: str
    state: str  # running, completed, failed
    dedup_scope: str
    submitted_at: float
    ended_at: float | None
    error: str | None
    target: str | None  # the node asked for (None: the whole workflow)
    partial: bool  # some nodes are not complete: their operators are not (all) shown
    datasets: list[DatasetLineage]
    nodes: list[NodeLineage]  # topological order, sources first
    ops: dict[str, OpLineage]
    warnings: list[str] = field(default_factory=list)

    def node(self, name: str) -> NodeLineage:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def dataset(self, name: str) -> DatasetLineage:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = codec.to_builtins(self)
        for key, op in self.ops.items():
            out["ops"][key]["shared"] = op.shared
        return out


# --- reading it ------------------------------------------------------------------------


async def build_lineage(
    fm: HasBusAndCas, workflow_id: str, node: str | None = None
) -> WorkflowLineage:
    """The lineage of a workflow, or (with `node`) of that node and all its ancestors."""
    bus, cas = fm.bus, fm.cas
    status = await _workflow_status(bus, workflow_id)
    if status is None:
        raise LineageError(f"no workflow {workflow_id!r}")
    if node is not None and node not in status.nodes:
        raise LineageError(
            f"workflow {workflow_id} has no node {node!r} (nodes: {', '.join(status.nodes)})"
        )
    warnings: list[str] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def manifest(digest: str | None, what: str) -> list[str] | None:
        if digest is None:
            return None
        try:
            async with sem:
                return await cas.get_manifest(digest)
        except CASError as exc:
            warnings.append(f"{what}: manifest {digest[:12]} unreadable ({exc})")
            return None

    # the status carries each node's spec; older statuses don't, and then the
    # submission (if still in its stream) says which node feeds which
    node_specs = {n: ns.spec for n, ns in status.nodes.items() if ns.spec is not None}
    if len(node_specs) < len(status.nodes):
        spec = await _submitted_spec(bus, status.workflow_id, status.submitted_at)
        if spec is not None:
            node_specs = {**{n.name: n for n in spec.nodes}, **node_specs}

    # source datasets
    datasets: dict[str, DatasetLineage] = {}
    for name in dict.fromkeys([*status.datasets, *status.tables]):
        m, table = status.datasets.get(name), status.tables.get(name)
        recs = await manifest(m, f"dataset {name!r}")
        if m is None and table is not None:
            # a workflow that failed before its dataset was recorded: the record digests
            # are those of the submitted table's rows, as the planner stored them
            recs = await _table_records(cas, table, warnings)
            m = codec.digest_of(recs) if recs is not None else None
        datasets[name] = DatasetLineage(
            name=name,
            manifest=m or "",
            table=table,
            records=recs or [],
            readable=recs is not None,
        )

    # each node's operator keys (slot order) and ordered outputs; for one node, only
    # what can be its ancestor (status.nodes is in topological order)
    names = list(status.nodes)
    if node is not None:
        names = names[: names.index(node) + 1]
        if len(node_specs) == len(status.nodes):
            wanted = _ancestors(node, {n: list(x.inputs) for n, x in node_specs.items()})
            names = [n for n in names if n in wanted]
    slot_keys: dict[str, list[str]] = {}
    node_outputs: dict[str, list[str] | None] = {}
    notes: dict[str, str] = {}
    ops_lists = await asyncio.gather(
        *(manifest(status.nodes[n].ops, f"node {n!r} operators") for n in names)
    )
    out_lists = await asyncio.gather(
        *(manifest(status.nodes[n].output, f"node {n!r} output") for n in names)
    )
    own_requests: dict[str, list[OpRequest]] | None = None
    for n, keys, outs in zip(names, ops_lists, out_lists, strict=True):
        ns = status.nodes[n]
        node_outputs[n] = outs
        if ns.complete:
            slot_keys[n] = keys or []
            if keys is None and ns.ops is not None:
                notes[n] = "its operator manifest is no longer in the CAS"
            continue
        if status.state == "failed":
            # the failure's lineage: what this workflow ran of the nodes it did not finish
            if own_requests is None:
                own_requests = await _requests_of_workflow(bus, status.workflow_id)
            slot_keys[n] = [r.key for r in own_requests.get(n, [])]
            notes[n] = "not complete (the workflow failed): the operators it had started"
        else:
            slot_keys[n] = []
            notes[n] = f"not complete yet ({ns.done}/{ns.total} operators done): not shown"

    # operator states and requests
    first_node: dict[str, str] = {}
    for n in names:
        for k in slot_keys[n]:
            first_node.setdefault(k, n)
    all_keys = list(first_node)

    async def op_state(key: str) -> OpState | None:
        async with sem:
            return await _op_state(bus, key)

    states = dict(
        zip(all_keys, await asyncio.gather(*(op_state(k) for k in all_keys)), strict=True)
    )
    requests = await _requests_of_ops(bus, all_keys)

    async def outputs_of(st: OpState) -> list[str]:
        if st.outputs is not None:
            return list(st.outputs)
        got = await manifest(st.output, f"operator {st.key[:12]} output")
        return got or []

    op_outputs = dict(
        zip(
            all_keys,
            await asyncio.gather(
                *(
                    outputs_of(st) if st is not None and st.state == "done" else _empty()
                    for st in states.values()
                )
            ),
            strict=True,
        )
    )

    # which node feeds which
    edges: dict[str, list[str]] = {}
    inferred: set[str] = set()
    for i, n in enumerate(names):
        if n in node_specs:
            edges[n] = list(node_specs[n].inputs)
        else:
            edges[n] = _infer_inputs(
                [states[k] for k in slot_keys[n]],
                [(d.name, d.manifest, d.records) for d in datasets.values()]
                + [(m, status.nodes[m].output, node_outputs[m]) for m in names[:i]],
            )
            inferred.add(n)

    # the graph
    ops: dict[str, OpLineage] = {}
    nodes: list[NodeLineage] = []
    for n in names:
        ns = status.nodes[n]
        nspec = node_specs.get(n)
        keys = slot_keys[n]
        kind, executor, params, model = _node_identity(nspec, [states[k] for k in keys])
        for slot, key in enumerate(keys):
            if key in ops:
                continue
            st = states[key]
            ops[key] = _op_lineage(key, n, st, op_outputs[key], requests.get(key, []))
            if st is None:
                op = ops[key]
                op.kind, op.executor, op.params, op.model = kind, executor, params, model
                op.inputs = _recover_inputs(
                    kind, slot, len(keys), edges[n], datasets, status.nodes, node_outputs
                )
        nodes.append(
            NodeLineage(
                name=n,
                kind=kind,
                executor=executor,
                params=params,
                inputs=edges[n],
                inputs_inferred=n in inferred,
                complete=ns.complete,
                total=ns.total,
                done=ns.done,
                failed=ns.failed,
                reused=ns.reused,
                output=ns.output,
                n_outputs=ns.n_outputs,
                ops=list(dict.fromkeys(keys)),
                model=model,
                note=notes.get(n),
            )
        )
    _link(nodes, ops, datasets)

    if node is not None:
        keep = _ancestors(node, edges)
        nodes = [x for x in nodes if x.name in keep]
        datasets = {k: v for k, v in datasets.items() if k in keep}
        kept_ops = {k for x in nodes for k in x.ops}
        ops = {k: v for k, v in ops.items() if k in kept_ops}
    if inferred:
        warnings.append(
            "the workflow's submission is no longer on the bus: node edges were inferred "
            "from digests"
        )
    return WorkflowLineage(
        workflow_id=status.workflow_id,
        name=status.name,
        tenant=status.tenant,
        state=status.state,
        dedup_scope=status.dedup_scope,
        submitted_at=status.submitted_at,
        ended_at=status.ended_at,
        error=status.error,
        target=node,
        partial=any(not x.complete for x in nodes),
        datasets=list(datasets.values()),
        nodes=nodes,
        ops=ops,
        warnings=warnings,
    )


async def _table_records(cas: CAS, table: str, warnings: list[str]) -> list[str] | None:
    try:
        rows = await cas.get_table(table)
    except CASError as exc:
        warnings.append(f"dataset table {table[:12]} unreadable ({exc})")
        return None
    return [codec.digest_of(r) for r in rows]


async def _empty() -> list[str]:
    return []


def _op_lineage(
    key: str, node: str, st: OpState | None, outputs: list[str], requests: list[OpRequest]
) -> OpLineage:
    if st is None:
        return OpLineage(key=key, node=node, state="invalidated", requests=requests)
    return OpLineage(
        key=key,
        node=node,
        state=st.state,
        kind=st.spec.kind,
        executor=st.spec.executor,
        version=st.spec.version,
        params=dict(st.spec.params),
        model=st.spec.model,
        inputs=list(st.spec.inputs),
        output=st.output,
        outputs=outputs,
        n_outputs=st.n_outputs,
        error=st.error,
        worker=st.worker,
        device_class=st.device_class,
        started_at=st.started_at,
        ended_at=st.ended_at,
        attempts=st.attempts,
        batch_size=st.batch_size,
        device_seconds=st.device_seconds,
        cost_usd=st.cost_usd,
        energy_j=st.energy_j,
        created_by=st.workflow_id,
        created_at=st.created_at,
        requests=requests,
    )


def _node_identity(
    nspec: NodeSpec | None, states: list[OpState | None]
) -> tuple[str, str, dict[str, Any], str | None]:
    """kind, executor, params and model of a node: from its operators, else its spec."""
    for st in states:
        if st is not None:
            return st.spec.kind, st.spec.executor, dict(st.spec.params), st.spec.model
    if nspec is not None:
        executor = f"{nspec.op}.{nspec.fn}" if nspec.fn else nspec.op
        return nspec.op, executor, dict(nspec.params), nspec.model
    return "", "", {}, None


def _fanout(kind: str) -> str:
    k = KINDS.get(kind)
    return k.fanout if k is not None else "record"


def _recover_inputs(
    kind: str,
    slot: int,
    n_slots: int,
    inputs: list[str],
    datasets: dict[str, DatasetLineage],
    nodes: dict[str, NodeStatus],
    node_outputs: dict[str, list[str] | None],
) -> list[str]:
    """The inputs of an operator whose KV entry is gone, from its slot: a record-fanout
    node's slots are its input node's output records, in order."""
    if _fanout(kind) == "all":
        out = []
        for name in inputs:
            m = datasets[name].manifest if name in datasets else nodes[name].output
            if not m:
                return []
            out.append(m)
        return out
    if len(inputs) != 1:
        return []
    src = inputs[0]
    recs = datasets[src].records if src in datasets else node_outputs.get(src)
    if recs is None or len(recs) != n_slots:
        return []
    return [recs[slot]]


def _infer_inputs(
    states: list[OpState | None], earlier: list[tuple[str, str | None, list[str] | None]]
) -> list[str]:
    """Which of the earlier datasets/nodes fed a node, from digests alone. `earlier` is
    (name, output manifest, ordered output records) in topological order; on a tie the
    nearest one wins (a filter that kept every record looks like its input)."""
    known = [st for st in states if st is not None]
    if not known:
        return []
    if known[0].spec.fanout == "all":
        out = []
        for digest in known[0].spec.inputs:
            match = [name for name, m, _ in earlier if m == digest]
            out.append(match[-1] if match else "?")
        return out
    seq = [st.spec.inputs[0] if st is not None and st.spec.inputs else None for st in states]
    wanted = {d for d in seq if d is not None}
    exact, containing = [], []
    for name, _, recs in earlier:
        if recs is None:
            continue
        if len(recs) == len(seq) and all(d is None or d == r for d, r in zip(seq, recs)):  # noqa: B905
            exact.append(name)
        elif wanted <= set(recs):
            containing.append(name)
    if exact:
        return [exact[-1]]
    return [containing[-1]] if containing else []


def _link(
    nodes: list[NodeLineage], ops: dict[str, OpLineage], datasets: dict[str, DatasetLineage]
) -> None:
    """Fill each operator's `upstream` from its inputs and its node's input nodes."""
    by_name = {x.name: x for x in nodes}
    dataset_sets = {name: set(d.records) for name, d in datasets.items()}
    producers: dict[str, dict[str, list[str]]] = {}
    for x in nodes:
        index: dict[str, list[str]] = {}
        for k in x.ops:
            for d in ops[k].outputs:
                index.setdefault(d, []).append(k)
        producers[x.name] = index
    for x in nodes:
        for k in x.ops:
            op = ops[k]
            if op.node != x.name or op.upstream:
                continue
            up: list[str] = []
            if _fanout(op.kind or x.kind) == "all":
                for name in x.inputs:
                    if name in datasets:
                        up.append(DATASET_PREFIX + name)
                    elif name in by_name:
                        up.extend(by_name[name].ops)
            else:
                for digest in op.inputs:
                    for name in x.inputs:
                        if name in datasets and digest in dataset_sets[name]:
                            up.append(DATASET_PREFIX + name)
                        elif name in producers:
                            up.extend(producers[name].get(digest, []))
            op.upstream = list(dict.fromkeys(up))


def _ancestors(node: str, edges: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(edges.get(n, []))
    return seen


# --- the bus ---------------------------------------------------------------------------


async def _workflow_status(bus: Bus, workflow_id: str) -> WorkflowStatus | None:
    if not subjects.is_token(workflow_id):
        return None
    kv = await bus.kv(streams.KV_WF)
    try:
        entry = await kv.get(workflow_id)
    except KeyNotFoundError:
        return None
    return codec.decode(entry.value, WorkflowStatus) if entry.value else None


async def _op_state(bus: Bus, key: str) -> OpState | None:
    kv = await bus.kv(streams.KV_OPS)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # deleted or purged: an invalidated cache entry
        return None
    if not entry.value:
        return None
    try:
        return codec.decode(entry.value, OpState)
    except codec.DecodeError:
        return None


async def _scan(
    bus: Bus,
    stream: str,
    filters: list[str],
    deliver: DeliverPolicy = DeliverPolicy.ALL,
    start: datetime.datetime | None = None,
    stop: Callable[[Any], bool] | None = None,
    limit: int | None = None,
) -> list[Any]:
    """The messages of `stream` matching `filters`, read once by a short-lived consumer
    that is deleted afterwards. `stop(msg)` ends the read early."""
    config = ConsumerConfig(
        deliver_policy=deliver,
        opt_start_time=start,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        filter_subjects=filters if len(filters) > 1 else None,
        filter_subject=filters[0] if len(filters) == 1 else None,
    )
    psub = await bus.js.pull_subscribe(filters[0], stream=stream, config=config)
    out: list[Any] = []
    name = None
    try:
        info = await psub.consumer_info()
        name = info.name
        pending = info.num_pending or 0
        while pending > 0 and (limit is None or len(out) < limit):
            try:
                msgs = await psub.fetch(min(pending, 256), timeout=2.0)
            except TimeoutError:
                break
            for msg in msgs:
                out.append(msg)
                if stop is not None and stop(msg):
                    return out
            pending = msgs[-1].metadata.num_pending if msgs else 0
    finally:
        try:
            await psub.unsubscribe()
            if name:
                await bus.js.delete_consumer(stream, name)
        except Exception:  # it expires by itself (inactive_threshold)
            pass
    return out


def _requests(msgs: Iterable[Any]) -> Iterable[OpRequest]:
    """The OpRequests among KV messages (a record that does not decode is skipped)."""
    for data in _kv_values(msgs):
        try:
            yield codec.decode(data, OpRequest)
        except codec.DecodeError:
            continue


def _kv_values(msgs: Iterable[Any]) -> Iterable[bytes]:
    for msg in msgs:
        op = (msg.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE") or not msg.data:
            continue
        yield msg.data


async def _requests_of_ops(bus: Bus, keys: list[str]) -> dict[str, list[OpRequest]]:
    """Every OpRequest of these operator keys (KV fm_requests "<key>.<workflow id>")."""
    stream = f"KV_{streams.KV_REQUESTS}"
    prefix = f"$KV.{streams.KV_REQUESTS}."
    chunks = [keys[i : i + REQUEST_CHUNK] for i in range(0, len(keys), REQUEST_CHUNK)]
    sem = asyncio.Semaphore(4)

    async def one(chunk: list[str]) -> list[Any]:
        async with sem:
            return await _scan(bus, stream, [f"{prefix}{k}.*" for k in chunk])

    out: dict[str, list[OpRequest]] = {}
    for msgs in await asyncio.gather(*(one(c) for c in chunks)):
        for req in _requests(msgs):
            out.setdefault(req.key, []).append(req)
    for reqs in out.values():
        reqs.sort(key=lambda r: r.at)
    return out


async def _requests_of_workflow(bus: Bus, workflow_id: str) -> dict[str, list[OpRequest]]:
    """This workflow's OpRequests by node, in the order they were made."""
    msgs = await _scan(
        bus, f"KV_{streams.KV_REQUESTS}", [f"$KV.{streams.KV_REQUESTS}.*.{workflow_id}"]
    )
    by_node: dict[str, list[OpRequest]] = {}
    for req in _requests(msgs):
        by_node.setdefault(req.node, []).append(req)
    for reqs in by_node.values():
        reqs.sort(key=lambda r: r.at)
    return by_node


async def _submitted_spec(bus: Bus, workflow_id: str, submitted_at: float) -> WorkflowSpec | None:
    """The spec as submitted (it names each node's inputs), read from FM_SUBMIT from
    just before the submission time; None once it has aged out of the stream."""
    start = datetime.datetime.fromtimestamp(submitted_at - SUBMIT_SKEW_S, tz=datetime.UTC)
    found: list[WorkflowSpec] = []
    horizon = submitted_at + SUBMIT_SKEW_S

    def stop(msg: Any) -> bool:
        try:
            sub = codec.decode(msg.data, SubmitWorkflow)
        except codec.DecodeError:
            return False
        if sub.workflow_id == workflow_id:
            found.append(sub.spec)
            return True
        return bool(msg.metadata.timestamp.timestamp() > horizon)

    try:
        await _scan(
            bus,
            streams.STREAM_SUBMIT,
            [subjects.SUBMIT],
            deliver=DeliverPolicy.BY_START_TIME,
            start=start,
            stop=stop,
            limit=SUBMIT_SCAN_MAX,
        )
    except Exception:  # the edges can still be inferred from the digests
        return None
    return found[0] if found else None


# --- OpenLineage -----------------------------------------------------------------------


def op_run_id(key: str) -> str:
    return str(uuid.uuid5(_OP_RUN_NS, key))


def workflow_run_id(workflow_id: str) -> str:
    return str(uuid.uuid5(_WF_RUN_NS, workflow_id))


def _iso(ts: float) -> str:
    t = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ds(name: str, **facets: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"namespace": OL_DATASET_NAMESPACE, "name": name}
    if facets:
        out["facets"] = facets
    return out


def _event(
    event_type: str,
    ts: float,
    run_id: str,
    job_name: str,
    run_facets: dict[str, Any],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "eventType": event_type,
        "eventTime": _iso(ts),
        "run": {"runId": run_id, "facets": run_facets},
        "job": {"namespace": OL_JOB_NAMESPACE, "name": job_name},
        "inputs": inputs,
        "outputs": outputs,
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
    }


def _flowmesh_facet(lin: WorkflowLineage, op: OpLineage) -> dict[str, Any]:
    return {
        "_producer": PRODUCER,
        "_schemaURL": FLOWMESH_FACET_SCHEMA,
        "key": op.key,
        "workflow_id": lin.workflow_id,
        "node": op.node,
        "kind": op.kind,
        "executor": op.executor,
        "version": op.version,
        "params": op.params,
        "model": op.model,
        "worker": op.worker,
        "device_class": op.device_class,
        "attempts": op.attempts,
        "batch_size": op.batch_size,
        "device_seconds": op.device_seconds,
        "cost_usd": op.cost_usd,
        "energy_j": op.energy_j,
        "created_by": op.created_by,
        "upstream": op.upstream,
        "requested_by": [
            {"workflow_id": r.workflow_id, "tenant": r.tenant, "node": r.node, "role": r.role}
            for r in op.requests
        ],
    }


def openlineage_events(lin: WorkflowLineage) -> list[dict[str, Any]]:
    """OpenLineage 2-0-2 RunEvents for the graph, in time order per run: the workflow's
    START, then START and COMPLETE/FAIL of every finished operator (parent: the workflow
    run), then the workflow's COMPLETE/FAIL when it has finished. runIds are uuid5 of the
    operator key / workflow id, so exporting twice gives the same runs. Datasets are CAS
    digests in namespace "flowmesh-cas": an operator reads its input records (or, for
    group/join, input manifests) and writes its output manifest and output records, so
    tools can join one operator's output record to the next one's input."""
    wf_run = workflow_run_id(lin.workflow_id)
    wf_job = lin.name
    parent = {
        "parent": {
            "_producer": PRODUCER,
            "_schemaURL": PARENT_FACET_SCHEMA,
            "run": {"runId": wf_run},
            "job": {"namespace": OL_JOB_NAMESPACE, "name": wf_job},
        }
    }
    sources = [_ds(d.manifest) for d in lin.datasets if d.manifest]
    events = [_event("START", lin.submitted_at, wf_run, wf_job, {}, sources, [])]
    for node in lin.nodes:
        job = f"{lin.name}.{node.name}"
        for key in node.ops:
            op = lin.ops[key]
            if op.node != node.name or op.state not in ("done", "failed"):
                continue  # pending or invalidated: no run to report
            facets = {**parent, "flowmesh": _flowmesh_facet(lin, op)}
            inputs = [_ds(d) for d in dict.fromkeys(op.inputs)]
            run_id = op_run_id(key)
            events.append(_event("START", op.started_at, run_id, job, facets, inputs, []))
            end_facets = dict(facets)
            if op.state == "failed":
                end_facets["errorMessage"] = {
                    "_producer": PRODUCER,
                    "_schemaURL": ERROR_FACET_SCHEMA,
                    "message": op.error or "failed",
                    "programmingLanguage": "python",
                }
            outputs = [_ds(op.output)] if op.output else []
            outputs += [_ds(d) for d in dict.fromkeys(op.outputs) if d != op.output]
            events.append(
                _event(
                    "COMPLETE" if op.state == "done" else "FAIL",
                    op.ended_at,
                    run_id,
                    job,
                    end_facets,
                    inputs,
                    outputs,
                )
            )
    if lin.state != "running":
        results = [_ds(n.output) for n in lin.nodes if n.output]
        wf_facets: dict[str, Any] = {}
        if lin.state == "failed":
            wf_facets["errorMessage"] = {
                "_producer": PRODUCER,
                "_schemaURL": ERROR_FACET_SCHEMA,
                "message": lin.error or "failed",
                "programmingLanguage": "python",
            }
        events.append(
            _event(
                "COMPLETE" if lin.state == "completed" else "FAIL",
                lin.ended_at or lin.submitted_at,
                wf_run,
                wf_job,
                wf_facets,
                sources,
                results,
            )
        )
    return events


# --- the terminal ----------------------------------------------------------------------


def _short(digest: str | None, n: int = 10) -> str:
    return digest[:n] if digest else "-"


def _params(params: dict[str, Any], width: int = 60) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _upstream_label(lin: WorkflowLineage, op: OpLineage) -> str:
    if not op.upstream:
        return "?" if op.state != "pending" else "-"
    groups: dict[str, list[str]] = {}
    for ref in op.upstream:
        if ref.startswith(DATASET_PREFIX):
            groups.setdefault(ref, [])
        else:
            up = lin.ops.get(ref)
            groups.setdefault(up.node if up else "?", []).append(ref)
    parts = []
    for group, refs in groups.items():
        if group.startswith(DATASET_PREFIX):
            parts.append(f"dataset {group[len(DATASET_PREFIX) :]}")
        elif len(refs) <= 2:
            parts.append(", ".join(f"{group}:{_short(r, 8)}" for r in refs))
        else:
            parts.append(f"{group} x{len(refs)}")
    return "; ".join(parts)


def _inputs_label(op: OpLineage) -> str:
    if not op.inputs:
        return "?"
    if len(op.inputs) == 1:
        return _short(op.inputs[0], 8)
    return f"{len(op.inputs)}: " + ",".join(_short(d, 6) for d in op.inputs[:2])


def _requested_by(lin: WorkflowLineage, op: OpLineage) -> str:
    if not op.requests:
        return "-"
    parts = []
    for r in op.requests:
        me = "*" if r.workflow_id == lin.workflow_id else ""
        parts.append(f"{r.workflow_id}{me}/{r.tenant} {r.role}")
    return "\n".join(parts)


def _duration(op: OpLineage) -> str:
    if not op.ended_at or not op.started_at:
        return "-"
    secs = op.ended_at - op.started_at
    return f"{secs * 1000:.0f} ms" if secs < 10 else f"{secs:.1f} s"


def render(lin: WorkflowLineage, console: Console, limit: int = 20) -> None:
    """The graph, node by node from the sources to the node asked for; at most `limit`
    operators per node (0: all)."""
    what = f"node {lin.target}" if lin.target else "all nodes"
    console.print(
        f"[bold]lineage of {escape(lin.workflow_id)}[/bold] ({escape(lin.name)}, "
        f"tenant {escape(lin.tenant)}, {lin.state}, dedup {lin.dedup_scope}): {escape(what)}"
    )
    if lin.partial:
        console.print(
            "[yellow]partial: the workflow "
            + ("is still running" if lin.state == "running" else "did not complete")
            + "; only operators of complete nodes (and finished ones) are shown[/yellow]"
        )
    for w in lin.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    for ds in lin.datasets:
        extra = "" if ds.readable else " [red](manifest no longer in the CAS)[/red]"
        console.print(
            f"[bold cyan]dataset {escape(ds.name)}[/bold cyan]: {len(ds.records)} records, "
            f"manifest {_short(ds.manifest, 12)}, table {_short(ds.table, 12)}{extra}"
        )
    for node in lin.nodes:
        ops = [lin.ops[k] for k in node.ops]
        versions = sorted({o.version for o in ops if o.version})
        version = ",".join(v[:12] for v in versions) or "?"
        edge = ", ".join(node.inputs) or "?"
        if node.inputs_inferred:
            edge += " (inferred)"
        state = "complete" if node.complete else "[yellow]not complete[/yellow]"
        shared = sum(1 for o in ops if o.shared)
        invalid = sum(1 for o in ops if o.state == "invalidated")
        title = (
            f"[bold]{escape(node.name)}[/bold] ← {escape(edge)}   "
            f"{escape(node.executor)}@{escape(version)} {escape(_params(node.params))}"
        )
        if node.model:
            title += f" model {_short(node.model, 12)}"
        summary = (
            f"{len(ops)} ops, {node.n_outputs} outputs, {state}; "
            f"{shared} shared with other workflows"
        )
        if invalid:
            summary += f", [red]{invalid} invalidated[/red]"
        console.print()
        console.print(title)
        console.print("  " + summary)
        if node.note:
            console.print(f"  [yellow]{escape(node.note)}[/yellow]")
        if not ops:
            continue
        shown = ops if limit <= 0 else ops[:limit]
        table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 1))
        for col in ("op", "state", "input", "← upstream", "output", "worker", "time", "att"):
            table.add_column(col, no_wrap=col not in ("← upstream",))
        table.add_column("requested by (* = this workflow)")
        for op in shown:
            state_txt = {
                "done": "done",
                "failed": "[red]failed[/red]",
                "invalidated": "[red]invalidated[/red]",
                "pending": "[yellow]pending[/yellow]",
            }[op.state]
            output = f"{_short(op.output, 8)} ({op.n_outputs})" if op.output else "-"
            worker = f"{op.worker} ({op.device_class})" if op.worker else "-"
            table.add_row(
                _short(op.key, 12),
                state_txt,
                _inputs_label(op),
                escape(_upstream_label(lin, op)),
                output,
                escape(worker),
                _duration(op),
                str(op.attempts or "-"),
                escape(_requested_by(lin, op)),
            )
        console.print(table)
        if len(ops) > len(shown):
            console.print(f"  … and {len(ops) - len(shown)} more ops (--limit 0 shows all)")


# --- the command -----------------------------------------------------------------------


@click.command("lineage")
@nats_option
@data_option
@cas_option
@click.argument("workflow_id")
@click.argument("node", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the whole graph as JSON")
@click.option(
    "--openlineage",
    "openlineage_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None,
    help="write OpenLineage 2-0-2 RunEvents to FILE as one JSON list ('-': stdout)",
)
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="operators shown per node (0: all)",
)
def lineage_command(
    nats_url: str,
    data_dir: Path,
    cas_url: str | None,
    workflow_id: str,
    node: str | None,
    as_json: bool,
    openlineage_file: Path | None,
    limit: int,
) -> None:
    """Print the graph that produced a workflow's results (or NODE's), down to the
    source data: every operator with its executor, params, inputs, output, worker,
    timing, attempts and the workflows/tenants that requested or reused it."""
    from flowmesh.engine.client import FlowMesh

    to_stdout = openlineage_file is not None and str(openlineage_file) == "-"
    if to_stdout and as_json:
        raise click.UsageError("--json and --openlineage - both want stdout; pick one")

    async def go() -> WorkflowLineage:
        async with await FlowMesh.connect(nats_url, client_cas(cas_url, data_dir)) as fm:
            return await build_lineage(fm, workflow_id, node)

    lin = _run(go)
    if openlineage_file is not None:
        events = openlineage_events(lin)
        text = json.dumps(events, indent=1)
        if to_stdout:
            click.echo(text)
            return
        openlineage_file.write_text(text + "\n")
        Console(stderr=True).print(
            f"wrote {len(events)} OpenLineage events to {escape(str(openlineage_file))}"
        )
    if as_json:
        click.echo(json.dumps(lin.to_dict(), default=str))
        return
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    render(lin, console, limit)
