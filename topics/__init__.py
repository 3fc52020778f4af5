"""topics: the contract between FlowMesh packages.

Subject names, JetStream stream/consumer/KV/object-store definitions, message schemas,
their codec, and the content-addressed store every component reads and writes.
engine/ and workers/ import this package and never each other.
"""

from flowmesh.topics import cas, codec, operators, streams, subjects
from flowmesh.topics.bus import Bus
from flowmesh.topics.messages import (
    Assignment,
    DatasetSpec,
    DeadLetter,
    NodeSpec,
    NodeStatus,
    OpDone,
    OpRequest,
    OpSpec,
    OpState,
    ReadyOp,
    SubmitWorkflow,
    WorkerInfo,
    WorkflowSpec,
    WorkflowStatus,
)

__all__ = [
    "Assignment",
    "Bus",
    "DatasetSpec",
    "DeadLetter",
    "NodeSpec",
    "NodeStatus",
    "OpDone",
    "OpRequest",
    "OpSpec",
    "OpState",
    "ReadyOp",
    "SubmitWorkflow",
    "WorkerInfo",
    "WorkflowSpec",
    "WorkflowStatus",
    "cas",
    "codec",
    "operators",
    "streams",
    "subjects",
]
