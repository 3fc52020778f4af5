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

Which node feeds which comes from the workflow's status (it carries each node's spec);
for a status written before it did, from the submission (the submit stream, read from
the submission time); when that has aged out, the edges are inferred from the digests
(`LineageNode.inputs_inferred`).

Where the record is incomplete the graph says so instead of failing: an operator whose KV
entry is gone (an invalidated cache entry) has state ``invalidated`` (its inputs are
recovered from its slot when possible); a running workflow shows the operators of its
completed nodes only (`Lineage.partial`); a failed workflow also shows the
finished operators of the nodes it did not complete, the failed one among them.

`openlineage_events` turns the graph into OpenLineage 2-0-2 RunEvents: one START and
one COMPLETE (or FAIL) per finished operator, and a START plus COMPLETE/FAIL for the
workflow, which is every operator's parent run. `flowmesh lineage WF [NODE]` prints the
graph (`--json` the whole graph, `--openlineage FILE` the events as one JSON list).

The package, one job per module: `model` (the graph's vocabulary; the graph itself is
the contract's typed `Lineage`, topics/api.py), `reads` (what the bus holds: workflow
status, operator entries, requests, the submission), `queries` (`build_lineage`: the
whole graph from those reads), `pages` (`build_lineage_page`: a page at a time, what the
gateway serves), `openlineage` (the RunEvents), `render` (the terminal) and `cli` (the
command).
"""

from flowmesh.engine.lineage.model import (
    DATASET_PREFIX,
    NODE_PREFIX,
    Lineage,
    LineageDataset,
    LineageError,
    LineageNode,
    LineageOp,
)
from flowmesh.engine.lineage.openlineage import (
    PRODUCER,
    SCHEMA_URL,
    op_run_id,
    openlineage_events,
    workflow_run_id,
)
from flowmesh.engine.lineage.queries import build_lineage
from flowmesh.engine.lineage.render import render

__all__ = [
    "DATASET_PREFIX",
    "NODE_PREFIX",
    "PRODUCER",
    "SCHEMA_URL",
    "Lineage",
    "LineageDataset",
    "LineageError",
    "LineageNode",
    "LineageOp",
    "build_lineage",
    "op_run_id",
    "openlineage_events",
    "render",
    "workflow_run_id",
]
