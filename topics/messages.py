"""Message schemas: every payload on every subject, and every KV value.

Messages carry digests and small metadata only; data lives in the CAS (see `store/cas.py`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from flowmesh.topics.operators import Fanout

DedupScope = Literal["global", "tenant", "workflow"]


# --- workflow specs -------------------------------------------------------------------


class DatasetSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A source dataset. A client gives `path` (jsonl/json/csv/parquet) or inline `records`;
    before submission it uploads the records to the CAS and sends only `digest`."""

    path: str | None = None
    records: list[dict[str, Any]] | None = None
    digest: str | None = None


class NodeSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    op: str
    inputs: list[str] = []
    fn: str | None = None
    model: str | None = None
    # a train node whose output adapter applies on top of `model` (RLAIF: generate with
    # the policy just trained); the node then waits for that node to complete
    adapter: str | None = None
    params: dict[str, Any] = {}


class WorkflowSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    nodes: list[NodeSpec]
    datasets: dict[str, DatasetSpec] = {}
    tenant: str = "default"
    dedup_scope: DedupScope = "global"


# --- fm.wf.submit ---------------------------------------------------------------------


class SubmitWorkflow(msgspec.Struct, frozen=True):
    workflow_id: str
    spec: WorkflowSpec  # datasets resolved to digests
    submitted_at: float


class CancelWorkflow(msgspec.Struct, frozen=True):
    """fm.wf.cancel: stop a workflow; its planner drops its waiters and starts nothing more."""

    workflow_id: str
    reason: str = "cancelled"


# --- operators ------------------------------------------------------------------------


class OpSpec(msgspec.Struct, frozen=True):
    """What determines an operator's output. Its canonical form, salted by the dedup
    scope, is hashed into the operator key (engine/keys.py)."""

    kind: str
    executor: str  # executor id, e.g. "map.text.upper"
    version: str  # the executor's implementation version as the worker advertised it
    fanout: Fanout
    params: dict[str, Any]
    model: str | None  # model weights digest
    # record fanout: one record digest per input; all: one manifest digest per input
    inputs: list[str]
    adapter: str | None = None  # LoRA adapter digest applied on top of `model`


class ReadyOp(msgspec.Struct, frozen=True):
    """One ready operator as components handle it in memory. On the wire operators
    travel in chunks (`ReadyChunk`, `Assignment`) that carry their shared spec once."""

    key: str
    spec: OpSpec
    batch_key: str  # operators with the same batch_key may share a batch
    workflow_id: str
    tenant: str
    attempt: int = 0  # deliveries before this one (a reclaim or a retry adds one)
    failures: int = 0  # executions of it that failed so far
    # executions that may fail before it is committed `failed`; set by the planner
    max_attempts: int = 3
    # KV revision of its `pending` entry when it was claimed (0: unknown, read it): the
    # worker commits with compare-and-set on it without reading the entry first
    revision: int = 0
    created_at: float = 0.0  # when that entry was created (0: unknown)
    # its one input is row `row` of the source table `table` (an Arrow table in the
    # CAS), not a stored record: the worker reads the row and checks its digest
    table: str | None = None
    row: int = -1
    # times its worker may be lost while running it (killed, crashed, out of memory)
    # before it is committed `failed` without running again; set by the planner
    max_reclaims: int = 6
    # what its inputs weigh, as JSON (the planner's estimate from the records its
    # parents produced): the scheduler's locality term prices fetching them
    input_bytes: int = 0


class OpItem(msgspec.Struct, frozen=True):
    """What one operator of a chunk has of its own (the rest is the chunk's spec)."""

    key: str
    inputs: list[str]
    workflow_id: str
    tenant: str
    revision: int = 0
    attempt: int = 0
    failures: int = 0
    max_attempts: int = 3
    created_at: float = 0.0
    table: str | None = None
    row: int = -1
    max_reclaims: int = 6
    input_bytes: int = 0


def item_of(op: ReadyOp) -> OpItem:
    return OpItem(
        op.key,
        op.spec.inputs,
        op.workflow_id,
        op.tenant,
        op.revision,
        op.attempt,
        op.failures,
        op.max_attempts,
        op.created_at,
        op.table,
        op.row,
        op.max_reclaims,
        op.input_bytes,
    )


def shared_spec(op: ReadyOp) -> OpSpec:
    """The part of an operator's spec every operator of its batch key has alike."""
    return msgspec.structs.replace(op.spec, inputs=[])


def ops_of(spec: OpSpec, batch_key: str, items: list[OpItem]) -> list[ReadyOp]:
    return [
        ReadyOp(
            key=it.key,
            spec=msgspec.structs.replace(spec, inputs=it.inputs),
            batch_key=batch_key,
            workflow_id=it.workflow_id,
            tenant=it.tenant,
            attempt=it.attempt,
            failures=it.failures,
            max_attempts=it.max_attempts,
            revision=it.revision,
            created_at=it.created_at,
            table=it.table,
            row=it.row,
            max_reclaims=it.max_reclaims,
            input_bytes=it.input_bytes,
        )
        for it in items
    ]


def chunks_of(ops: list[ReadyOp], size: int, more: bool = False) -> list[ReadyChunk]:
    """Ready operators as chunks of at most `size`, one batch key per chunk (in order)."""
    groups: dict[str, list[ReadyOp]] = {}
    for op in ops:
        groups.setdefault(op.batch_key, []).append(op)
    return [
        ReadyChunk(shared_spec(group[0]), bk, [item_of(op) for op in group[i : i + size]], more)
        for bk, group in groups.items()
        for i in range(0, len(group), size)
    ]


class ReadyChunk(msgspec.Struct, frozen=True):
    """fm.op.ready.<pool>: operators whose inputs all exist, of one batch key: the spec
    they share once (its `inputs` empty), then each operator's own part."""

    spec: OpSpec
    batch_key: str
    items: list[OpItem]
    # more operators of the same node are still to come (its upstream is running): the
    # scheduler may let a partial batch of these wait for company
    more: bool = False

    @property
    def ops(self) -> list[ReadyOp]:
        return ops_of(self.spec, self.batch_key, self.items)


class Assignment(msgspec.Struct, frozen=True):
    """fm.assign.<worker>: a batch of compatible operators for one worker; the spec
    they share travels once."""

    batch_id: str
    worker: str
    spec: OpSpec
    batch_key: str
    items: list[OpItem]
    assigned_at: float

    @classmethod
    def of(cls, batch_id: str, worker: str, ops: list[ReadyOp], assigned_at: float) -> Assignment:
        if not ops or any(op.batch_key != ops[0].batch_key for op in ops):
            raise ValueError("an assignment holds operators of one batch key")
        return cls(
            batch_id,
            worker,
            shared_spec(ops[0]),
            ops[0].batch_key,
            [item_of(o) for o in ops],
            assigned_at,
        )

    @property
    def ops(self) -> list[ReadyOp]:
        return ops_of(self.spec, self.batch_key, self.items)


OpStatus = Literal["done", "failed"]


# the error of an operator stopped because the workflow that claimed it was cancelled:
# not a failure of its work, so the workflows still waiting for it claim it again
OP_CANCELLED = "its workflow was cancelled"


class OpResult(msgspec.Struct, frozen=True, kw_only=True):
    """What running an operator gave, declared once: the completion event (OpDone), the
    operator's KV entry (OpState) and its lineage (api.LineageOp) carry these fields by
    inheriting them. Messages are JSON maps keyed by field name, so an entry stored when
    each message declared the fields itself decodes unchanged."""

    output: str | None = None  # manifest digest: list of output record digests
    outputs: list[str] | None = None  # the same list, inline when small
    n_outputs: int = 0
    # its output records as JSON: what a tenant's quota counts, and what the planner
    # tells the scheduler its children will read (ReadyOp.input_bytes)
    output_bytes: int = 0
    error: str | None = None
    worker: str = ""
    device_class: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    attempts: int = 0  # deliveries it took, 1 when nothing went wrong
    traceback: str = ""  # failed: where the executor raised (last attempt)


class OpDone(OpResult, frozen=True):
    """fm.op.done: an operator's result was committed (or it failed for good)."""

    key: str
    status: OpStatus
    # the workflow whose request ran it (OpState.workflow_id): an operator stopped as
    # OP_CANCELLED is claimed again by the other workflows waiting for it, never by this one
    workflow_id: str = ""


class DoneBatch(msgspec.Struct, frozen=True):
    """fm.op.done: the completions of one batch (or of a part of it, when they would
    not fit one message), announced together once every one is committed."""

    batch_id: str
    done: list[OpDone]


class OpState(OpResult, frozen=True):
    """Value of the operator KV entry (bucket fm_ops, key = operator key).

    Created `pending` by the planner with create-if-absent; moved to `done`/`failed`
    exactly once by a worker with compare-and-set on the entry's revision."""

    key: str
    state: Literal["pending", "done", "failed"]
    spec: OpSpec
    workflow_id: str  # the workflow that created it
    tenant: str
    created_at: float
    batch_size: int = 0  # operators in the batch it ran in
    device_seconds: float = 0.0  # its share of the batch's time on the worker
    price_per_hour: float = 0.0  # the worker class's $/h when it ran
    watts: float = 0.0  # the worker class's busy power when it ran
    cost_usd: float = 0.0  # device_seconds x price_per_hour
    energy_j: float = 0.0  # device_seconds x watts
    # its share of time the worker spent for its batch but did not bill (warm-up,
    # waiting for a core): the fleet's overhead, not its tenant's (workers/billing.py)
    overhead_seconds: float = 0.0

    def to_done(self) -> OpDone:
        """The completion event that announces this (final) state."""
        result = {f: getattr(self, f) for f in OpResult.__struct_fields__}
        return OpDone(
            key=self.key,
            status="failed" if self.state == "failed" else "done",
            workflow_id=self.workflow_id,
            **result,
        )


RequestRole = Literal["ran", "joined", "reused"]


class OpRequest(msgspec.Struct, frozen=True):
    """Value in KV fm_requests under "<op key>.<workflow id>": one workflow asked for
    one operator. `ran`: its request created the operator; `joined`: it was already
    pending or running for another workflow (in-flight dedup); `reused`: it was already
    committed (completed dedup). Lineage and cost attribution read these, through
    engine/lineage/reads.py, which also expands the RanRequests of a wave.

    Only `joined` and `reused` are written one per key; the `ran` ones of a wave are
    one RanRequests entry, and the workflow that ran an operator is also its KV
    fm_ops entry's `workflow_id` (so a lookup by operator key finds it there)."""

    key: str
    workflow_id: str
    tenant: str
    node: str
    role: RequestRole
    at: float


RAN_PREFIX = "ran-"  # KV fm_requests keys "ran-<digest>.<workflow id>" hold RanRequests


class RanRequests(msgspec.Struct, frozen=True):
    """Value in KV fm_requests under "ran-<digest>.<workflow id>": the operators of one
    wave of one node that this workflow's requests created (role `ran`), one stored
    write for the lot instead of one per operator. The digest covers the node and the
    operators' keys, so a planner replaying the submission writes the same entry again
    (refused: it exists); a replay's waves cut otherwise record a key twice, as `ran`
    both times (readers keep one request per key and workflow, the earliest)."""

    workflow_id: str
    tenant: str
    node: str
    at: float
    keys: list[str]

    def requests(self) -> list[OpRequest]:
        return [
            OpRequest(k, self.workflow_id, self.tenant, self.node, "ran", self.at)
            for k in self.keys
        ]


# --- workers --------------------------------------------------------------------------


class WorkerInfo(msgspec.Struct, frozen=True):
    """A worker's registration and heartbeat: the value of its key in the fm_workers KV
    bucket (streams.KV_WORKERS), written every second and right after each batch."""

    worker: str
    device_class: str
    pools: list[str]
    executors: dict[str, str]  # executor id -> version
    max_batch: dict[str, int]  # executor id -> largest batch it takes
    models: dict[str, str]  # model name -> weights digest it can serve
    resident: list[str]  # weights digests loaded in memory now
    price_per_hour: float
    watts: float
    memory_gb: float
    slots: int  # assignments it may hold at once (one running, the rest queued)
    batches_done: int
    started_at: float
    sent_at: float
    stopping: bool = False
    # the last batch it ran: the scheduler refines its latency model of this device
    # class from these (engine/scheduler/fleet.py LatencyEstimator)
    last_batch_kind: str = ""
    last_batch_size: int = 0
    last_batch_seconds: float = 0.0
    last_batch_model: str = ""  # its model digest, "" for none
    # the batch it is executing now ("" between batches): if it dies, only this batch's
    # operators count a loss (the others it held never started); see ReadyOp.attempt
    running: str = ""
    # weights digest -> size in GB of the models it has on disk (loaded or fetched):
    # the scheduler packs device memory and scales batch times by these; a model not
    # listed is assumed to be the scheduler's default size
    model_gb: dict[str, float] = {}


# --- workflow status ------------------------------------------------------------------


class NodeStatus(msgspec.Struct):
    total: int = 0  # operators created so far
    done: int = 0
    failed: int = 0
    reused: int = 0  # operators another workflow created (joined in flight or reused)
    complete: bool = False
    output: str | None = None  # manifest digest of the node's ordered output records
    n_outputs: int = 0
    ops: str | None = None  # manifest of the node's operator keys, in slot order
    spec: NodeSpec | None = None  # the node as submitted (its inputs name its parents)


class OpFailure(msgspec.Struct, frozen=True):
    """The operator that failed a workflow: which node, which key, what it raised."""

    node: str
    key: str
    error: str
    traceback: str = ""
    attempts: int = 0
    worker: str = ""


class WorkflowStatus(msgspec.Struct):
    """Value of the workflow KV entry (bucket fm_wf, key = workflow id)."""

    workflow_id: str
    name: str
    tenant: str
    state: Literal["running", "completed", "failed", "cancelled"]
    submitted_at: float
    updated_at: float
    nodes: dict[str, NodeStatus]
    error: str | None = None
    ended_at: float | None = None
    datasets: dict[str, str] = {}  # source dataset name -> manifest of its record digests
    tables: dict[str, str] = {}  # source dataset name -> the Arrow table digest submitted
    dedup_scope: DedupScope = "global"
    failure: OpFailure | None = None  # set when an operator failed the workflow


# --- dead letters ---------------------------------------------------------------------


class DeadLetter(msgspec.Struct, frozen=True):
    """fm.dlq.<component>: a message a component could not use, with the reason."""

    subject: str
    reason: str
    component: str
    payload_head: str  # first bytes of the payload, for a human to look at
    size: int
    at: float
