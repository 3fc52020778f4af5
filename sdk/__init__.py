"""FlowMesh: a multi-tenant service fabric for composable LLM workflows.

    import asyncio
    import flowmesh

    async def main() -> None:
        async with await flowmesh.Client.connect() as client:
            wf = await client.submit("workflow.yaml")
            await client.wait(wf)
            print(await client.result(wf, "answers"))

    asyncio.run(main())

Everything public is named in `__all__` (tests/test_public_api.py keeps it so) and is
imported on first use, so `import flowmesh.workers...` in a worker loads no client code.
The parts live under flowmesh.topics (the contract), flowmesh.engine, flowmesh.workers,
flowmesh.loadgen and flowmesh.configs.
"""

# underscored: the module's public namespace is exactly __all__ (and the sub-packages)
import importlib as _importlib
import importlib.metadata as _metadata
import typing as _typing

try:
    __version__ = _metadata.version("flowmesh-fabric")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_WHERE = {
    "Client": "flowmesh.client",
    "load_spec": "flowmesh.engine.spec",
    "SpecError": "flowmesh.engine.spec",
    "Settings": "flowmesh.topics.config.settings",
    "SettingsError": "flowmesh.topics.config.settings",
    "WorkflowSpec": "flowmesh.topics.messages",
    "WorkflowStatus": "flowmesh.topics.messages",
    "NodeStatus": "flowmesh.topics.messages",
    "OpFailure": "flowmesh.topics.messages",
    "NodeSpec": "flowmesh.topics.messages",
    "DatasetSpec": "flowmesh.topics.messages",
    "WorkflowSummary": "flowmesh.topics.api",
    "Lineage": "flowmesh.topics.api",
    "LineageNode": "flowmesh.topics.api",
    "LineageOp": "flowmesh.topics.api",
    "LineageDataset": "flowmesh.topics.api",
    "LineageCursor": "flowmesh.topics.api",
    "CostSummary": "flowmesh.topics.api",
    "Bill": "flowmesh.topics.api",
    "FlowMeshError": "flowmesh.topics.errors",
    "NotFound": "flowmesh.topics.errors",
    "NotComplete": "flowmesh.topics.errors",
    "Unavailable": "flowmesh.topics.errors",
    "WaitTimeout": "flowmesh.topics.errors",
    "WorkflowFailed": "flowmesh.topics.errors",
    "GatewayError": "flowmesh.topics.errors",
    "DataDirMismatch": "flowmesh.topics.errors",
}

__all__ = [
    "Bill",
    "Client",
    "CostSummary",
    "DataDirMismatch",
    "DatasetSpec",
    "FlowMeshError",
    "GatewayError",
    "Lineage",
    "LineageCursor",
    "LineageDataset",
    "LineageNode",
    "LineageOp",
    "NodeSpec",
    "NodeStatus",
    "NotComplete",
    "NotFound",
    "OpFailure",
    "Settings",
    "SettingsError",
    "SpecError",
    "Unavailable",
    "WaitTimeout",
    "WorkflowFailed",
    "WorkflowSpec",
    "WorkflowStatus",
    "WorkflowSummary",
    "__version__",
    "load_spec",
]


def __getattr__(name: str) -> _typing.Any:
    if name in _WHERE:
        value = getattr(_importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowmesh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if _typing.TYPE_CHECKING:
    from flowmesh.client import Client
    from flowmesh.engine.spec import SpecError, load_spec
    from flowmesh.topics.api import (
        Bill,
        CostSummary,
        Lineage,
        LineageCursor,
        LineageDataset,
        LineageNode,
        LineageOp,
        WorkflowSummary,
    )
    from flowmesh.topics.config.settings import Settings, SettingsError
    from flowmesh.topics.errors import (
        DataDirMismatch,
        FlowMeshError,
        GatewayError,
        NotComplete,
        NotFound,
        Unavailable,
        WaitTimeout,
        WorkflowFailed,
    )
    from flowmesh.topics.messages import (
        DatasetSpec,
        NodeSpec,
        NodeStatus,
        OpFailure,
        WorkflowSpec,
        WorkflowStatus,
    )
