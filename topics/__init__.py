"""topics: the contract between FlowMesh packages.

The contract itself sits at this level: subject names (`subjects`), stream/consumer/KV/
object-store definitions (`streams`), message schemas (`messages`), the tenant API's wire
types (`api`), operator kinds and their parameters (`operators`), the codec (`codec`) and
the exception hierarchy (`errors`). Beside it, in subfolders named for what they hold, the
pieces every process needs to speak it: `bus/` (NATS and Kafka), `store/` (the CAS),
`config/` (settings, credentials), `telemetry/` (logs, metrics exporter).
engine/ and workers/ import this package and never each other.
"""

from flowmesh.topics import codec, operators, streams, subjects
from flowmesh.topics.bus.nats import Bus
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
from flowmesh.topics.store import cas

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
