"""The result fields (output, error, worker, device, times, attempts) are declared once,
in OpResult, and the messages that carry them still read what was stored before."""

from __future__ import annotations

import json

from flowmesh.topics import codec
from flowmesh.topics.api import LineageOp
from flowmesh.topics.messages import OpDone, OpResult, OpSpec, OpState

RESULT_FIELDS = {
    "output",
    "outputs",
    "n_outputs",
    "output_bytes",
    "error",
    "worker",
    "device_class",
    "started_at",
    "ended_at",
    "attempts",
    "traceback",
}

# an fm_ops entry as a worker wrote it when OpState declared every field itself
STORED_OP_STATE = (
    b'{"key":"k1","state":"done","spec":{"kind":"map","executor":"map.text.upper",'
    b'"version":"1","fanout":"record","params":{},"model":null,"inputs":["d1"],'
    b'"adapter":null},"workflow_id":"wf","tenant":"acme","created_at":1.0,'
    b'"output":"m1","outputs":["r1"],"n_outputs":1,"error":null,"worker":"w0",'
    b'"device_class":"cpu","started_at":2.0,"ended_at":3.0,"attempts":1,"batch_size":4,'
    b'"device_seconds":0.5,"price_per_hour":1.0,"watts":10.0,"cost_usd":0.1,'
    b'"energy_j":5.0,"traceback":""}'
)


def test_the_result_fields_are_declared_once_and_shared() -> None:
    assert set(OpResult.__struct_fields__) == RESULT_FIELDS
    for typ in (OpDone, OpState, LineageOp):
        assert issubclass(typ, OpResult)
        assert set(typ.__struct_fields__) >= RESULT_FIELDS


def test_a_stored_op_state_decodes_and_encodes_to_the_same_keys() -> None:
    st = codec.decode(STORED_OP_STATE, OpState)
    assert (st.output, st.outputs, st.worker, st.device_class) == ("m1", ["r1"], "w0", "cpu")
    assert (st.started_at, st.ended_at, st.attempts, st.batch_size) == (2.0, 3.0, 1, 4)
    # every stored key comes back under its name with its value (fields added since
    # come with their defaults)
    stored, again = json.loads(STORED_OP_STATE), json.loads(codec.encode(st))
    assert {k: again[k] for k in stored} == stored


def test_a_completion_carries_every_result_field_of_its_state() -> None:
    spec = OpSpec("map", "map.text.upper", "1", "record", {}, None, ["d1"])
    st = OpState(
        key="k",
        state="failed",
        spec=spec,
        workflow_id="wf",
        tenant="t",
        created_at=1.0,
        error="boom",
        worker="w1",
        device_class="gpu",
        started_at=2.0,
        ended_at=3.0,
        attempts=3,
        traceback="Traceback ...",
    )
    done = st.to_done()
    assert done.status == "failed" and done.key == "k"
    assert {f: getattr(done, f) for f in RESULT_FIELDS} == {
        f: getattr(st, f) for f in RESULT_FIELDS
    }
    # an OpDone published before the change decodes as well
    old = b'{"key":"k","status":"done","output":null,"outputs":["r"],"n_outputs":1,'
    old += b'"error":null,"worker":"w","device_class":"cpu","started_at":1.0,'
    old += b'"ended_at":2.0,"traceback":"","attempts":1}'
    assert codec.decode(old, OpDone).outputs == ["r"]
