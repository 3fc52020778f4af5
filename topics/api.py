"""The tenant API's wire: request and reply bodies of `fm.api.<tenant>.<verb>`, and the
typed results (`Lineage`, `CostSummary`, `WorkflowSummary`) the client returns whichever
way it is connected. The gateway (engine/gateway.py) serves them; the client (engine/
tenant_client.py) speaks them without importing the engine's lineage, cost or rendering.

Verbs (request body -> reply data, all JSON):
  submit   SubmitRequest  -> SubmitReply        datasets inline as records only
  status   WorkflowRequest -> WorkflowStatus
  list     PageRequest    -> [WorkflowSummary]   newest first, a page at a time
  result   ResultRequest  -> ResultPage
  lineage  LineageRequest -> Lineage            a page of one node's operators; other
                                                tenants' requests redacted
  cost     PageRequest    -> CostSummary        a page of this tenant's workflows' bills
  cancel   WorkflowRequest -> {workflow_id, state}
Every reply is an ApiReply: {ok, data} or {ok: false, code, error}.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from flowmesh.topics.messages import OpRequest, OpResult, WorkflowSpec

# Below NATS's default max_payload (1 MiB), with room for the envelope.
MAX_REQUEST_BYTES = 768 * 1024
MAX_REPLY_BYTES = 768 * 1024
RESULT_PAGE_ROWS = 1000
LIST_MAX = 1000  # newest workflows a list answers with
LIST_PAGE = 100  # workflows per list or cost page unless asked otherwise
LINEAGE_PAGE = 500  # operators per lineage page unless asked otherwise (and at most)

ErrorCode = Literal[
    "not_found", "not_complete", "bad_request", "too_large", "too_many_requests", "internal"
]


class ApiReply(msgspec.Struct, omit_defaults=True):
    ok: bool
    data: Any = None
    code: ErrorCode | None = None
    error: str | None = None


class SubmitRequest(msgspec.Struct, forbid_unknown_fields=True):
    spec: WorkflowSpec
    workflow_id: str | None = None


class WorkflowRequest(msgspec.Struct, forbid_unknown_fields=True):
    workflow_id: str


class ResultRequest(msgspec.Struct, forbid_unknown_fields=True):
    workflow_id: str
    node: str
    offset: int = 0
    limit: int = RESULT_PAGE_ROWS


class LineageCursor(msgspec.Struct, forbid_unknown_fields=True):
    """Where a lineage page starts: operator `offset` (in slot order, each once) of node
    `node`."""

    node: str
    offset: int = 0


class LineageRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A page of a workflow's lineage (of `node` and its ancestors; None: all nodes):
    every node's header and up to `limit` operators of the node `page` names (None: the
    first node), from its offset. The reply's `next_page` says where the next one starts."""

    workflow_id: str
    node: str | None = None
    page: LineageCursor | None = None
    limit: int = LINEAGE_PAGE


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class PageRequest(msgspec.Struct, forbid_unknown_fields=True):
    """list and cost: the tenant's workflows newest first, `limit` from `offset`."""

    offset: int = 0
    limit: int = LIST_PAGE


class SubmitReply(msgspec.Struct):
    workflow_id: str


class WorkflowSummary(msgspec.Struct):
    """One line of `Client.workflows()`."""

    workflow_id: str
    name: str
    state: str
    submitted_at: float
    ended_at: float | None
    ops_total: int
    ops_done: int
    tenant: str = ""


class ResultPage(msgspec.Struct):
    records: list[dict[str, Any]]
    offset: int
    total: int
    next_offset: int | None  # None: this was the last page


# --- typed results: lineage and cost ------------------------------------------------------
# Decoded leniently (unknown fields ignored), so an engine that reports more than this
# client knows about still answers it.


class LineageOp(OpResult, frozen=True, kw_only=True):
    """One operator behind a node's results: what ran (its result fields are OpResult's),
    where, for whom, at what cost."""

    key: str
    node: str  # the (first) node of the workflow that used it
    state: str  # pending, done, failed, or invalidated (its KV entry is gone)
    kind: str = ""
    executor: str = ""
    version: str = ""
    params: dict[str, Any] = {}
    model: str | None = None  # model weights digest
    # record fanout: the input record digests; all: one output manifest per input node
    inputs: list[str] = []
    outputs: list[str] = []  # its output record digests (resolved: never None here)
    batch_size: int = 0
    device_seconds: float = 0.0
    cost_usd: float = 0.0
    energy_j: float = 0.0
    created_by: str = ""  # workflow whose request created the operator
    created_at: float = 0.0
    requests: list[OpRequest] = []  # every workflow that asked (the gateway: own only)
    upstream: list[str] = []  # op keys and "dataset:<name>"
    shared: bool = False  # more than one workflow asked for it
    # through the gateway: how many other workflows (not named) asked for it too
    other_requests: int = 0


class LineageDataset(msgspec.Struct):
    """A source dataset of the workflow."""

    name: str
    manifest: str  # manifest of its record digests
    table: str | None  # the Arrow table digest that was submitted
    records: list[str]
    readable: bool = True  # False when the manifest is no longer in the CAS
    n_records: int = 0  # len(records); a page leaves `records` out and says how many


class LineageNode(msgspec.Struct):
    """A node of the workflow and the operators (keys, in slot order) behind it."""

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
    n_ops: int = 0  # len(ops) of the whole node (a page's node lists only its own)
    note: str | None = None  # why its ops are missing or partial


class Lineage(msgspec.Struct):
    """A workflow's (or one node's) provenance: nodes in topological order, the operators
    behind them keyed by operator key, and the source datasets."""

    workflow_id: str
    name: str
    tenant: str
    state: str
    dedup_scope: str
    submitted_at: float
    ended_at: float | None
    error: str | None
    target: str | None  # the node asked for (None: the whole workflow)
    partial: bool  # some nodes are not complete: their operators are not (all) shown
    datasets: list[LineageDataset]
    nodes: list[LineageNode]  # topological order, sources first
    ops: dict[str, LineageOp]
    warnings: list[str] = []
    # a page (LineageRequest): its nodes list only this page's operator keys, `ops` only
    # those; `next_page` is where the next page starts (None: this was the last one)
    paged: bool = False
    next_page: LineageCursor | None = None

    def node(self, name: str) -> LineageNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def dataset(self, name: str) -> LineageDataset:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)


class Bill(msgspec.Struct):
    """One workflow's or one tenant's account: what it paid for its share of the fleet,
    and what it would have paid running everything alone."""

    name: str
    tenant: str
    workflows: int = 0
    ops: int = 0
    ran: int = 0
    shared: int = 0
    device_seconds: float = 0.0
    paid_usd: float = 0.0
    paid_energy_j: float = 0.0
    alone_usd: float = 0.0
    alone_energy_j: float = 0.0
    saved_usd: float = 0.0
    saved_energy_j: float = 0.0


class CostSummary(msgspec.Struct):
    """Bills per tenant and per workflow (through the gateway: the caller's own only, a
    page of its workflows from `offset`, `limit` of them; 0 and 0 when not paged)."""

    tenants: dict[str, Bill] = {}
    workflows: dict[str, Bill] = {}
    offset: int = 0
    limit: int = 0
