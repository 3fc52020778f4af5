"""The lineage graph as OpenLineage 2-0-2 RunEvents."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from flowmesh.engine.lineage.model import Lineage, LineageOp

PRODUCER = "https://github.com/flowmesh/flowmesh"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
PARENT_FACET_SCHEMA = (
    "https://openlineage.io/spec/facets/1-0-1/ParentRunFacet.json#/$defs/ParentRunFacet"
)
ERROR_FACET_SCHEMA = (
    "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet"
)
FLOWMESH_FACET_SCHEMA = (
    "https://github.com/flowmesh/flowmesh/blob/main/docs/openlineage/FlowMeshRunFacet.json"
)
OL_JOB_NAMESPACE = "flowmesh"
OL_DATASET_NAMESPACE = "flowmesh-cas"
# uuid5 namespaces: an operator's (and a workflow's) runId is the same in every export
_OP_RUN_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/flowmesh/flowmesh/op")
_WF_RUN_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/flowmesh/flowmesh/workflow")


def op_run_id(key: str) -> str:
    return str(uuid.uuid5(_OP_RUN_NS, key))


def workflow_run_id(workflow_id: str) -> str:
    return str(uuid.uuid5(_WF_RUN_NS, workflow_id))


def _iso(ts: float) -> str:
    t = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ds(name: str, **facets: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"namespace": OL_DATASET_NAMESPACE, "name": name}
    if facets:
        out["facets"] = facets
    return out


def _event(
    event_type: str,
    ts: float,
    run_id: str,
    job_name: str,
    run_facets: dict[str, Any],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "eventType": event_type,
        "eventTime": _iso(ts),
        "run": {"runId": run_id, "facets": run_facets},
        "job": {"namespace": OL_JOB_NAMESPACE, "name": job_name},
        "inputs": inputs,
        "outputs": outputs,
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
    }


def _flowmesh_facet(lin: Lineage, op: LineageOp) -> dict[str, Any]:
    return {
        "_producer": PRODUCER,
        "_schemaURL": FLOWMESH_FACET_SCHEMA,
        "key": op.key,
        "workflow_id": lin.workflow_id,
        "node": op.node,
        "kind": op.kind,
        "executor": op.executor,
        "version": op.version,
        "params": op.params,
        "model": op.model,
        "worker": op.worker,
        "device_class": op.device_class,
        "attempts": op.attempts,
        "batch_size": op.batch_size,
        "device_seconds": op.device_seconds,
        "cost_usd": op.cost_usd,
        "energy_j": op.energy_j,
        "created_by": op.created_by,
        "upstream": op.upstream,
        "requested_by": [
            {"workflow_id": r.workflow_id, "tenant": r.tenant, "node": r.node, "role": r.role}
            for r in op.requests
        ],
    }


def openlineage_events(lin: Lineage) -> list[dict[str, Any]]:
    """OpenLineage 2-0-2 RunEvents for the graph, in time order per run: the workflow's
    START, then START and COMPLETE/FAIL of every finished operator (parent: the workflow
    run), then the workflow's COMPLETE/FAIL when it has finished. runIds are uuid5 of the
    operator key / workflow id, so exporting twice gives the same runs. Datasets are CAS
    digests in namespace "flowmesh-cas": an operator reads its input records (or, for
    group/join, input manifests) and writes its output manifest and output records, so
    tools can join one operator's output record to the next one's input."""
    wf_run = workflow_run_id(lin.workflow_id)
    wf_job = lin.name
    parent = {
        "parent": {
            "_producer": PRODUCER,
            "_schemaURL": PARENT_FACET_SCHEMA,
            "run": {"runId": wf_run},
            "job": {"namespace": OL_JOB_NAMESPACE, "name": wf_job},
        }
    }
    sources = [_ds(d.manifest) for d in lin.datasets if d.manifest]
    events = [_event("START", lin.submitted_at, wf_run, wf_job, {}, sources, [])]
    for node in lin.nodes:
        job = f"{lin.name}.{node.name}"
        for key in node.ops:
            op = lin.ops[key]
            if op.node != node.name or op.state not in ("done", "failed"):
                continue  # pending or invalidated: no run to report
            facets = {**parent, "flowmesh": _flowmesh_facet(lin, op)}
            inputs = [_ds(d) for d in dict.fromkeys(op.inputs)]
            run_id = op_run_id(key)
            events.append(_event("START", op.started_at, run_id, job, facets, inputs, []))
            end_facets = dict(facets)
            if op.state == "failed":
                end_facets["errorMessage"] = {
                    "_producer": PRODUCER,
                    "_schemaURL": ERROR_FACET_SCHEMA,
                    "message": op.error or "failed",
                    "programmingLanguage": "python",
                }
            outputs = [_ds(op.output)] if op.output else []
            outputs += [_ds(d) for d in dict.fromkeys(op.outputs) if d != op.output]
            events.append(
                _event(
                    "COMPLETE" if op.state == "done" else "FAIL",
                    op.ended_at,
                    run_id,
                    job,
                    end_facets,
                    inputs,
                    outputs,
                )
            )
    if lin.state != "running":
        results = [_ds(n.output) for n in lin.nodes if n.output]
        wf_facets: dict[str, Any] = {}
        if lin.state == "failed":
            wf_facets["errorMessage"] = {
                "_producer": PRODUCER,
                "_schemaURL": ERROR_FACET_SCHEMA,
                "message": lin.error or "failed",
                "programmingLanguage": "python",
            }
        events.append(
            _event(
                "COMPLETE" if lin.state == "completed" else "FAIL",
                lin.ended_at or lin.submitted_at,
                wf_run,
                wf_job,
                wf_facets,
                sources,
                results,
            )
        )
    return events
