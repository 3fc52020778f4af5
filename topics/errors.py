"""The one exception hierarchy every client call raises, direct or through the gateway.

    try:
        rows = await client.result(wf, "answers")
    except flowmesh.NotFound: ...        # no such workflow or node (for this tenant)
    except flowmesh.NotComplete: ...     # the node has not finished yet
    except flowmesh.FlowMeshError: ...   # anything else FlowMesh refused or could not do

`code` is the same short string the gateway sends on the wire (topics/api.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowmesh.topics.messages import WorkflowStatus


class FlowMeshError(Exception):
    """Base of every error FlowMesh raises on purpose."""

    code: str = "error"


class NotFound(FlowMeshError, LookupError):
    """No such workflow or node, as far as this caller may know."""

    code = "not_found"


class NotComplete(FlowMeshError):
    """The node has not completed yet: its results cannot be read."""

    code = "not_complete"


class Unavailable(FlowMeshError, ConnectionError):
    """NATS could not be reached, or no engine answered."""

    code = "unavailable"


class WaitTimeout(FlowMeshError, TimeoutError):
    """The workflow was still running when the wait's timeout ran out."""

    code = "timeout"


class WorkflowFailed(FlowMeshError):
    """The workflow failed; `status.failure` says which operator, why and where."""

    code = "failed"

    def __init__(self, status: WorkflowStatus) -> None:
        self.status = status
        super().__init__(f"workflow {status.workflow_id} failed: {status.error}")


class GatewayError(FlowMeshError):
    """The gateway refused or failed a request; `code` says how (bad_request, too_large,
    internal, timeout)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class DataDirMismatch(FlowMeshError):
    """This client's data directory or CAS is not the one the running fabric uses, so a
    dataset it uploads or a result it reads would be in the wrong place."""

    code = "data_dir_mismatch"
