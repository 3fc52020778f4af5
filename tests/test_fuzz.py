"""Fuzzing: bad input gets a clear error or a dead letter, never a crash or a hang.

Two phases:
(a) in process, thousands of hypothesis cases: every msgspec type on the bus (and every
    operator's params) through the one codec with garbage, mutated and deeply nested
    bytes; the workflow spec validator with garbage, mutated specs and random graphs.
    The only outcomes allowed are a value of the type or the codec's/validator's typed
    error with a reason.
(b) live (slow): a real engine and worker; a few hundred generated undecodable messages
    on every subject they consume; each must leave a dead-letter record with a reason,
    the processes must survive, and a normal workflow submitted afterwards completes.

Totals are printed at the end of the module (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import graphlib
import os
import string
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.js.api import DeliverPolicy

import flowmesh.topics.messages as messages
import flowmesh.topics.operators as operators
from flowmesh.engine.spec import SpecError, load_spec, parse_spec, topo_order
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.messages import DeadLetter, WorkflowSpec
from flowmesh.topics.store.cas import CAS, CASError, FileBackend
from tests.conftest import connect

# --- counting ------------------------------------------------------------------------

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_totals() -> Iterator[None]:
    yield
    if COUNTS:
        lines = "\n".join(f"  {name}: {n}" for name, n in sorted(COUNTS.items()))
        # a case is one generated input (or one live message); the cross-type decodes
        # of the same inputs are extra checks, not extra cases
        cases = sum(n for name, n in COUNTS.items() if "checks" not in name)
        print(f"\nfuzz cases:\n{lines}\n  total cases: {cases}")


def run_cases(name: str, prop: Callable[[], None], quota: int) -> None:
    """Run a hypothesis property and check it really ran `quota` cases."""
    before = COUNTS[name]
    prop()
    ran = COUNTS[name] - before
    assert ran >= quota, f"{name}: only {ran} of {quota} cases ran"


def fuzz(cases: int) -> settings:
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,  # no .hypothesis/ in the shared tree; failures print their seed
        # no explain phase: its tracer makes a failing case on a big input take minutes
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- strategies ----------------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
any_json = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _struct_types(module: Any) -> list[type[msgspec.Struct]]:
    return [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, msgspec.Struct) and v.__module__ == module.__name__
    ]


# every payload on every subject, every KV value, and every operator's params
TYPES = _struct_types(messages) + _struct_types(operators)


def valid(ti: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """Plain (JSON) data of the shape `ti` describes: a well-formed message to mutate."""
    it = msgspec.inspect
    if isinstance(ti, it.StructType):
        required = {f.encode_name: valid(f.type) for f in ti.fields if f.required}
        optional = {f.encode_name: valid(f.type) for f in ti.fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(ti, it.StrType):
        return st.text(
            alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12
        )
    if isinstance(ti, it.BoolType):
        return st.booleans()
    if isinstance(ti, it.IntType):
        return st.integers(min_value=0, max_value=64)
    if isinstance(ti, it.FloatType):
        return st.floats(min_value=0, max_value=1e9)
    if isinstance(ti, it.NoneType):
        return st.none()
    if isinstance(ti, it.LiteralType):
        return st.sampled_from(list(ti.values))
    if isinstance(ti, it.ListType | it.VarTupleType):
        return st.lists(valid(ti.item_type), max_size=2)
    if isinstance(ti, it.DictType):
        return st.dictionaries(valid(ti.key_type), valid(ti.value_type), max_size=2)
    if isinstance(ti, it.UnionType):
        return st.one_of([valid(t) for t in ti.types])
    if isinstance(ti, it.AnyType):
        return any_json
    if isinstance(ti, it.Metadata):
        return valid(ti.type)
    raise NotImplementedError(f"no strategy for {ti!r}: teach tests/test_fuzz.py valid()")


def mutate(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """One structural mutation somewhere in a JSON tree: a value replaced by anything,
    a key dropped or added, a container emptied."""
    containers = isinstance(value, dict | list) and bool(value)
    if containers and depth < 6 and draw(st.integers(0, 2)):
        if isinstance(value, dict):
            key = draw(st.sampled_from(sorted(value)))
            return {**value, key: mutate(draw, value[key], depth + 1)}
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], mutate(draw, value[i], depth + 1), *value[i + 1 :]]
    how = draw(st.integers(0, 3))
    if how == 0 or not isinstance(value, dict) or not value:
        return draw(any_json)
    if how == 1:
        key = draw(st.sampled_from(sorted(value)))
        return {k: v for k, v in value.items() if k != key}
    if how == 2:
        return {**value, draw(st.text(max_size=6)): draw(any_json)}
    return {k: draw(any_json) for k in value}


@st.composite
def mutated(draw: st.DrawFn, shape: st.SearchStrategy[Any]) -> Any:
    return mutate(draw, draw(shape))


@st.composite
def byte_edit(draw: st.DrawFn, data: bytes) -> bytes:
    """Truncate, flip, insert or splice raw bytes of an encoding."""
    if not data:
        return draw(st.binary(max_size=16))
    i = draw(st.integers(0, len(data) - 1))
    how = draw(st.integers(0, 3))
    if how == 0:
        return data[:i]
    if how == 1:
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if how == 2:
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    return data[:i] + data[i:] * 2


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """JSON nested hundreds to thousands deep, bare or inside a field."""
    n = draw(st.integers(200, 5000))
    open_, close = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = open_ * n + b"1" + close * n
    return draw(st.sampled_from([inner, b'{"spec":' + inner + b"}", b'{"params":' + inner + b"}"]))


def bad_bytes(typ: type[msgspec.Struct]) -> st.SearchStrategy[bytes]:
    shape = valid(msgspec.inspect.type_info(typ))
    return st.one_of(
        st.binary(max_size=256),
        any_json.map(codec.canonical),
        shape.map(codec.canonical).flatmap(byte_edit),
        mutated(shape).map(codec.canonical),
        nested(),
        shape.map(codec.canonical),  # well-formed ones too: they must decode
    )


def decode_outcome(data: bytes, typ: type[Any]) -> str:
    """The property of every decoder: a value of the type (which re-encodes to an equal
    value) or codec.DecodeError that names the type and says why."""
    try:
        value = codec.decode(data, typ)
    except codec.DecodeError as exc:
        prefix = f"cannot decode {typ.__name__}: "
        assert str(exc).startswith(prefix) and len(str(exc)) > len(prefix)
        return "error"
    assert isinstance(value, typ)
    assert codec.decode(codec.encode(value), typ) == value
    return "value"


# --- (a) decoders --------------------------------------------------------------------

PER_TYPE = 250


@pytest.mark.parametrize("typ", TYPES, ids=lambda t: t.__name__)
def test_fuzz_every_message_type(typ: type[msgspec.Struct]) -> None:
    """Bytes shaped after `typ` (garbage, mutated, nested, well-formed) through its own
    decoder, and through every other type's too (a message on the wrong subject)."""
    outcomes: Counter[str] = Counter()

    @fuzz(PER_TYPE)
    @given(bad_bytes(typ))
    def prop(data: bytes) -> None:
        COUNTS["decode"] += 1
        outcomes[decode_outcome(data, typ)] += 1
        for other in TYPES:
            if other is not typ:
                COUNTS["decode checks (cross-type)"] += 1
                decode_outcome(data, other)

    run_cases("decode", prop, PER_TYPE)
    # both outcomes were exercised: the generator makes real messages and real garbage
    assert outcomes["value"] and outcomes["error"], outcomes


def test_well_formed_messages_decode() -> None:
    # the generator's well-formed shapes are accepted: otherwise the property above
    # would pass by rejecting everything
    def accepts(typ: type[msgspec.Struct]) -> Callable[[], None]:
        @fuzz(20)
        @given(valid(msgspec.inspect.type_info(typ)))
        def prop(value: Any) -> None:
            COUNTS["well-formed"] += 1
            assert decode_outcome(codec.canonical(value), typ) == "value"

        return prop

    for typ in TYPES:
        if typ is not operators.GenerateParams:  # its __post_init__ rejects some combinations
            run_cases("well-formed", accepts(typ), 1)  # NoParams has one value only


def test_fuzz_convert_of_plain_data() -> None:
    # parsed YAML reaches the schema through codec.convert: Python values, not bytes
    @fuzz(600)
    @given(st.sampled_from(TYPES), any_json | st.sets(st.integers(), max_size=3))
    def prop(typ: type[msgspec.Struct], value: Any) -> None:
        COUNTS["convert"] += 1
        try:
            assert isinstance(codec.convert(value, typ), typ)
        except codec.DecodeError as exc:
            assert str(exc)

    run_cases("convert", prop, 600)


def test_deeply_nested_json_is_a_decode_error_not_a_crash() -> None:
    # msgspec raises RecursionError for these; the codec turns it into the one error
    # every consumer dead-letters (before, it killed the consumer loop and the message
    # came back forever)
    for typ in (messages.SubmitWorkflow, messages.DoneBatch, messages.WorkerInfo):
        with pytest.raises(codec.DecodeError, match=typ.__name__):
            codec.decode(b"[" * 3000 + b"]" * 3000, typ)
    with pytest.raises(codec.DecodeError):
        codec.convert(_deep_list(3000), WorkflowSpec)


def _deep_list(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


# --- (a) the spec validator ----------------------------------------------------------

NAMES = ["d", "e", "a", "b", "c", "x"]
node_strategy = st.fixed_dictionaries(
    {
        "name": st.sampled_from(NAMES) | st.text(max_size=8),
        "op": st.sampled_from(sorted(operators.KINDS)) | st.text(max_size=6),
    },
    optional={
        "input": st.sampled_from(NAMES),
        "inputs": st.lists(st.sampled_from(NAMES) | st.text(max_size=4), max_size=3),
        "fn": st.sampled_from(["text.upper", "field.min_words", "a b", "../x"]),
        "model": st.sampled_from(["tiny-llama", ""]),
        "adapter": st.sampled_from(NAMES),
        "params": st.dictionaries(
            st.sampled_from(["field", "by", "on", "rule", "method", "metric", "n", "min"]),
            any_json,
            max_size=3,
        ),
    },
)
spec_strategy = st.fixed_dictionaries(
    {"name": st.text(max_size=10), "nodes": st.lists(node_strategy, max_size=6)},
    optional={
        "tenant": st.text(max_size=10),
        "dedup_scope": st.sampled_from(["global", "tenant", "workflow", "galaxy"]),
        "datasets": st.dictionaries(
            st.sampled_from(NAMES[:2]) | st.text(max_size=5),
            st.fixed_dictionaries(
                {},
                optional={
                    "records": st.lists(
                        st.dictionaries(st.text(max_size=3), json_leaf), max_size=2
                    ),
                    "path": st.text(max_size=8),
                    "digest": st.sampled_from(["0" * 64, "0" * 64 + "\n", "x"]),
                },
            ),
            max_size=2,
        ),
    },
)
GOOD_SPEC: dict[str, Any] = {
    "name": "good",
    "tenant": "t1",
    "datasets": {"d": {"records": [{"q": "a b c", "topic": "x"}]}},
    "nodes": [
        {"name": "a", "op": "map", "fn": "text.upper", "input": "d", "params": {"field": "q"}},
        {"name": "b", "op": "filter", "fn": "field.min_words", "input": "a"},
        {"name": "c", "op": "group", "input": "b", "params": {"by": "topic"}},
        {"name": "j", "op": "join", "inputs": ["b", "c"], "params": {"on": "topic"}},
        {"name": "g", "op": "generate", "model": "tiny-llama", "input": "a"},
    ],
}


def spec_outcome(data: Any) -> str:
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return "error"
    assert isinstance(spec, WorkflowSpec)
    topo_order(spec)  # an accepted spec can be planned
    return "value"


@pytest.mark.slow
def test_fuzz_spec_validator() -> None:
    outcomes: Counter[str] = Counter()

    @fuzz(1500)
    @given(
        st.one_of(
            spec_strategy,
            any_json,
            mutated(st.just(GOOD_SPEC)),
            st.just(GOOD_SPEC),
        )
    )
    def prop(data: Any) -> None:
        COUNTS["spec"] += 1
        outcomes[spec_outcome(data)] += 1

    run_cases("spec", prop, 1500)
    assert outcomes["value"] and outcomes["error"], outcomes


def test_fuzz_spec_graphs_cycles_are_found_exactly() -> None:
    """Random graphs of map nodes: a cycle is reported iff the graph has one."""

    @fuzz(700)
    @given(
        st.integers(1, 8).flatmap(
            lambda n: st.lists(
                st.lists(st.integers(-1, n - 1), min_size=1, max_size=2), min_size=n, max_size=n
            )
        )
    )
    def prop(parents: list[list[int]]) -> None:
        COUNTS["spec-graph"] += 1
        nodes = [
            {
                "name": f"n{i}",
                "op": "join" if len(set(ps)) == 2 else "map",
                **({"fn": "text.upper"} if len(set(ps)) == 1 else {"params": {"on": "k"}}),
                "inputs": [f"n{p}" if p >= 0 else "d" for p in dict.fromkeys(ps)],
            }
            for i, ps in enumerate(parents)
        ]
        data = {"name": "g", "datasets": {"d": {"records": [{"k": 1}]}}, "nodes": nodes}
        sorter = graphlib.TopologicalSorter(
            {f"n{i}": {f"n{p}" for p in ps if p >= 0} for i, ps in enumerate(parents)}
        )
        try:
            order = list(sorter.static_order())
            cyclic = False
        except graphlib.CycleError:
            cyclic = True
        try:
            spec = parse_spec(data)
        except SpecError as exc:
            assert cyclic, exc.problems
            assert any(p.startswith("cycle") or "reads its own output" in p for p in exc.problems)
            return
        assert not cyclic
        planned = topo_order(spec)
        assert sorted(planned) == sorted(order)
        for i, ps in enumerate(parents):
            for p in ps:
                if p >= 0:
                    assert planned.index(f"n{p}") < planned.index(f"n{i}")

    run_cases("spec-graph", prop, 700)


@pytest.mark.slow
def test_fuzz_yaml_spec_files() -> None:
    """`flowmesh submit file.yaml`: any text in the file is a spec or a SpecError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wf.yaml"

        @fuzz(500)
        @given(
            st.one_of(
                st.text(max_size=200),
                spec_strategy.map(lambda d: yaml.safe_dump(d)).flatmap(
                    lambda s: byte_edit(s.encode()).map(lambda b: b.decode("utf-8", "replace"))
                ),
                st.sampled_from(["a: &a [*a]", "x: !!python/object:os.system {}", "[\x00]"]),
            )
        )
        def prop(text: str) -> None:
            COUNTS["spec-yaml"] += 1
            path.write_text(text)
            try:
                load_spec(path)
            except SpecError as exc:
                assert exc.problems

        run_cases("spec-yaml", prop, 500)


def test_a_long_chain_listed_leaf_first_is_validated() -> None:
    from flowmesh.engine.spec import MAX_NODES

    n = MAX_NODES  # the longest chain a spec may hold (engine/spec.py)
    nodes = [
        {"name": f"n{i}", "op": "map", "fn": "text.upper", "input": f"n{i - 1}" if i else "d"}
        for i in range(n)
    ]
    spec = parse_spec({"name": "chain", "datasets": {"d": {"records": [{}]}}, "nodes": nodes[::-1]})
    assert len(topo_order(spec)) == n


@pytest.mark.parametrize(
    "text", ["[" * 2000, "name: x\nnodes: []\ndatasets: {d: {path: 2024-13-45}}"]
)
def test_yaml_that_pyyaml_cannot_build_is_a_spec_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises(SpecError):
        load_spec(path)


# --- (a) CAS blob decoders -----------------------------------------------------------


def test_fuzz_cas_layout_decoders() -> None:
    """Whatever intact bytes a digest names, reading it as a record, manifest or table
    gives a value or a CASError."""
    with tempfile.TemporaryDirectory() as tmp:
        cas = CAS(FileBackend(tmp))

        @fuzz(500)
        @given(
            st.one_of(
                st.binary(max_size=200),
                any_json.map(codec.canonical),
                st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=3).map(
                    codec.canonical
                ),
                nested(),
            )
        )
        def prop(blob: bytes) -> None:
            COUNTS["cas-layouts"] += 1

            async def go() -> None:
                digest = await cas.put(blob)
                for read in (cas.get_record, cas.get_manifest, cas.get_table):
                    try:
                        await read(digest)
                    except CASError as exc:
                        assert str(exc)

            asyncio.run(go())

        run_cases("cas-layouts", prop, 500)


# --- (b) live: bad messages on every consumed subject of a running fabric -----------

LIVE_PER_SUBJECT = int(os.environ.get("FM_FUZZ_LIVE", "250"))


def undecodable(typ: type[msgspec.Struct], cases: int, non_empty: bool = False) -> list[bytes]:
    """`cases` generated payloads that do not decode as `typ` (checked here, so each
    one must come back as a dead letter)."""
    out: list[bytes] = []

    @fuzz(cases)
    @given(bad_bytes(typ).filter(lambda b: decode_outcome(b, typ) == "error"))
    def collect(data: bytes) -> None:
        if data or not non_empty:
            out.append(data)

    collect()
    return out


def letter_of(subject: str, payload: bytes) -> tuple[str, str, int]:
    """What a dead letter records of a message (bus.Bus.dead_letter)."""
    return subject, payload[:512].decode("utf-8", "replace"), len(payload)


async def read_dead_letters(
    bus: Bus, want: Counter[tuple[str, str, int]], timeout: float
) -> tuple[Counter[tuple[str, str, int]], list[DeadLetter]]:
    """Dead letters as they arrive, until every wanted one is there or time is up."""
    sub = await bus.js.subscribe(
        subjects.DLQ_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    seen: Counter[tuple[str, str, int]] = Counter()
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + timeout
    try:
        while want - seen and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                continue
            letter = codec.decode(msg.data, DeadLetter)
            letters.append(letter)
            subject = letter.subject
            if "." not in subject:  # a heartbeat named by its bare KV key (older scheduler)
                subject = f"$KV.{streams.KV_WORKERS}.{subject}"
            seen[(subject, letter.payload_head, letter.size)] += 1
    finally:
        await sub.unsubscribe()
    return seen, letters


@pytest.mark.slow
async def test_live_fabric_dead_letters_every_bad_message_and_keeps_working(
    make_fabric: Callable[..., Any],
) -> None:
    fabric = make_fabric(workers=1)
    fm = await connect(fabric, 1)
    worker = fabric.worker_ids[0]
    # what each consumer reads, and the schema it expects there
    targets: list[tuple[str, type[msgspec.Struct], str]] = [
        (subjects.SUBMIT, messages.SubmitWorkflow, "planner"),
        (subjects.DONE, messages.DoneBatch, "planner"),
        (subjects.ready("cpu"), messages.ReadyChunk, "scheduler"),
        (subjects.ready("gpu"), messages.ReadyChunk, "scheduler"),
        (subjects.assign(worker), messages.Assignment, "worker"),
        # heartbeats are KV puts; the scheduler names the dead letter by the KV key
        (f"$KV.{streams.KV_WORKERS}.fuzz", messages.WorkerInfo, "scheduler"),
    ]
    want: Counter[tuple[str, str, int]] = Counter()
    futures = []
    for subject, typ, _ in targets:
        heartbeat = subject.startswith("$KV.")
        # an empty KV value reads as a delete, not as a message
        payloads = undecodable(typ, LIVE_PER_SUBJECT, non_empty=heartbeat)
        # and one oversized message per subject
        payloads.append(b"{" + b"x" * (streams.MAX_MESSAGE_BYTES + 10))
        for i, data in enumerate(payloads):
            target = f"{subject}-{i}" if heartbeat else subject
            want[letter_of(target, data)] += 1
            futures.append(await fm.bus.js.publish_async(target, data))
        COUNTS["live"] += len(payloads)
    await asyncio.gather(*futures)

    seen, letters = await read_dead_letters(fm.bus, want, timeout=120.0)
    missing = want - seen
    assert not missing, f"{sum(missing.values())} bad messages left no dead letter"
    assert all(letter.reason and letter.component for letter in letters)
    by_component = Counter(letter.component for letter in letters)
    for _, _, component in targets:
        assert by_component[component] > 0
    print(
        f"\nlive: {sum(want.values())} bad messages, {len(letters)} dead letters "
        f"{dict(by_component)}"
    )

    # every process is still up, and the fabric still works
    assert all(fabric.alive().values()), fabric.alive()
    spec = parse_spec(
        {
            "name": "after-fuzz",
            "tenant": "t-after",
            "datasets": {"d": {"records": [{"q": f"hello {i}"} for i in range(5)]}},
            "nodes": [
                {
                    "name": "up",
                    "op": "map",
                    "fn": "text.upper",
                    "input": "d",
                    "params": {"field": "q"},
                }
            ],
        }
    )
    wf = await fm.submit(spec, workflow_id=f"after-{uuid.uuid4().hex[:8]}")
    status = await fm.wait(wf, timeout=90)
    assert status.state == "completed"
    assert await fm.result(wf, "up") == [{"q": f"HELLO {i}"} for i in range(5)]
    assert all(fabric.alive().values()), fabric.alive()
    await fm.close()
