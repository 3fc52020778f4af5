"""The lineage graph's vocabulary. The graph itself is the contract's typed result
(topics/api.py: Lineage, LineageNode, LineageOp, LineageDataset), so the engine, the
gateway and both clients hold the same structs."""

from __future__ import annotations

from flowmesh.topics.api import Lineage, LineageDataset, LineageNode, LineageOp
from flowmesh.topics.lineage import DATASET_PREFIX, NODE_PREFIX

__all__ = [
    "DATASET_PREFIX",
    "NODE_PREFIX",
    "Lineage",
    "LineageDataset",
    "LineageError",
    "LineageNode",
    "LineageOp",
]


class LineageError(RuntimeError):
    """No such workflow or node."""
