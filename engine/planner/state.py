"""What the planner holds of a running workflow: its nodes, their slots and the
operators each slot waits for. Rebuilt from the streams on every start, never stored."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from flowmesh.topics.messages import NodeSpec, NodeStatus, OpFailure, WorkflowStatus
from flowmesh.topics.operators import OperatorKind

Pos = tuple[int, ...]


class Unresolved(Exception):
    """No live worker has advertised the executor or model an operator needs (yet)."""


@dataclass
class NodeRun:
    name: str
    spec: NodeSpec | None  # None for a source dataset
    kind: OperatorKind | None
    inputs: list[str]
    downstream: list[str] = field(default_factory=list)
    outputs: dict[Pos, list[str] | None] = field(default_factory=dict)  # slot -> records
    keys: dict[Pos, str] = field(default_factory=dict)  # slot -> operator key
    pending: int = 0
    upstream_complete: bool = False
    complete: bool = False
    manifest: str | None = None
    ordered: list[str] = field(default_factory=list)
    status: NodeStatus = field(default_factory=NodeStatus)
    # operators waiting for the node that trains this node's adapter
    deferred: list[tuple[Pos, list[str]]] = field(default_factory=list)
    adapter_digest: str | None = None
    # a source dataset whose records are read from its table, not stored one by one
    table: str | None = None
    # what the records it produced so far weigh (as JSON) and how many there are: the
    # mean is what each record its children read is taken to weigh
    out_bytes: int = 0
    out_records: int = 0

    def record_bytes(self) -> float:
        return self.out_bytes / self.out_records if self.out_records else 0.0


@dataclass
class WorkflowRun:
    wf_id: str
    spec: Any  # WorkflowSpec
    salt: str
    submitted_at: float
    nodes: dict[str, NodeRun]
    state: str = "running"
    error: str | None = None
    ended_at: float | None = None
    failure: OpFailure | None = None
    # operators done in the status a previous planner wrote: a replaying planner does not
    # write a lower count over it (progress never goes backwards)
    done_floor: int = 0

    def ops_done(self) -> int:
        return sum(n.status.done for n in self.nodes.values() if n.spec is not None)

    def to_status(self) -> WorkflowStatus:
        return WorkflowStatus(
            workflow_id=self.wf_id,
            name=self.spec.name,
            tenant=self.spec.tenant,
            state=self.state,  # type: ignore[arg-type]
            submitted_at=self.submitted_at,
            updated_at=time.time(),
            nodes={n.name: n.status for n in self.nodes.values() if n.spec is not None},
            error=self.error,
            ended_at=self.ended_at,
            datasets={
                n.name: n.manifest for n in self.nodes.values() if n.spec is None and n.manifest
            },
            dedup_scope=self.spec.dedup_scope,
            tables={name: ds.digest for name, ds in self.spec.datasets.items() if ds.digest},
            failure=self.failure,
        )


@dataclass
class Waiter:
    run: WorkflowRun
    node: str
    pos: Pos
    inputs: list[str]  # to start its operator again (its claimant's workflow was cancelled)


@dataclass
class Parked:
    run: WorkflowRun
    node: str
    pos: Pos
    inputs: list[str]
    since: float


@dataclass
class Retry:
    """A step the bus or the store refused (a timeout, a lost connection, an outage
    longer than the store's own retries), done again by the retry loop: starting a wave
    of operators, completing a node, releasing a trained adapter. Each step is safe to
    repeat and queues itself again if refused again; meanwhile what it would finish stays
    counted pending, so nothing downstream completes without it."""

    what: str  # "start", "complete" or "adapter": the metric's label
    run: WorkflowRun
    step: Callable[[], Awaitable[None]]
