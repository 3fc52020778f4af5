"""The tenant API's wire: request and reply bodies of `fm.api.<tenant>.<verb>`, and the
typed results (`Lineage`, `CostSummary`, `WorkflowSummary`) the client returns whichever
way it is connected. The gateway (engine/gateway.py) serves them; the client (engine/
tenant_client.py) speaks them without importing the engine's lineage, cost or rendering.

Verbs (request body -> reply data, all JSON):
  submit   SubmitRequest  -> SubmitReply        datasets inline as records only
  status   WorkflowRequest -> WorkflowStatus
  list     PageRequest    -> [WorkflowSummary]   newest first, a page at a time
  result   ResultRequest  -> ResultPage
  lineage  LineageRequest -> Lineage            other tenants' requests redacted
  cost     PageRequest    -> CostSummary        a page of this tenant's workflows' bills
  cancel   WorkflowRequest -> {workflow_id, state}
Every reply is an ApiReply: {ok, data} or {ok: false, code, error}.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from flowmesh.topics.messages import RequestRole, WorkflowSpec

# Below NATS's default max_payload (1 MiB), with room for the envelope.
MAX_REQUEST_BYTES = 768 * 1024
MAX_REPLY_BYTES = 768 * 1024
RESULT_PAGE_ROWS = 1000
LIST_MAX = 1000  # newest workflows a list answers with
LIST_PAGE = 100  # workflows per list or cost page unless asked otherwise

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


class LineageRequest(msgspec.Struct, forbid_unknown_fields=True):
    workflow_id: str
    node: str | None = None


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


class LineageRequestRecord(msgspec.Struct):
    """A workflow that asked for an operator, and how (ran, joined, reused)."""

    workflow_id: str
    tenant: str
    node: str
    role: RequestRole
    at: float
    key: str = ""


class LineageOp(msgspec.Struct):
    """One operator behind a node's results: what ran, where, for whom, at what cost."""

    key: str
    node: str
    state: str
    kind: str = ""
    executor: str = ""
    version: str = ""
    params: dict[str, Any] = {}
    model: str | None = None
    inputs: list[str] = []
    output: str | None = None
    outputs: list[str] = []
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
    created_by: str = ""
    created_at: float = 0.0
    requests: list[LineageRequestRecord] = []
    upstream: list[str] = []
    shared: bool = False
    # through the gateway: how many other workflows (not named) asked for it too
    other_requests: int = 0


class LineageDataset(msgspec.Struct):
    name: str
    manifest: str
    table: str | None
    records: list[str]
    readable: bool = True


class LineageNode(msgspec.Struct):
    name: str
    kind: str
    executor: str
    params: dict[str, Any]
    inputs: list[str]
    inputs_inferred: bool
    complete: bool
    total: int
    done: int
    failed: int
    reused: int
    output: str | None
    n_outputs: int
    ops: list[str]
    model: str | None = None
    note: str | None = None


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
    target: str | None
    partial: bool
    datasets: list[LineageDataset]
    nodes: list[LineageNode]
    ops: dict[str, LineageOp]
    warnings: list[str] = []


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
