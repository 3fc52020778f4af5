"""Python transforms and the built-in CPU executors (map, filter, tokenize, join, group).

A `map`/`filter` node names a transform from this module's registry. Transforms register
with the `@transform` decorator: the built-ins below, and user plugins imported by
`load_plugins`. Every executor's version includes a hash of its source code, so editing a
transform (or a built-in executor) changes the key of every operator it serves and a
cached result computed by the old code is never reused for the new code.

Executors are pure functions of their batch (see base.py). A problem with one operator's
own input or args becomes an OpError for that operator only; the rest of the batch
still commits.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import operator
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import CodeType
from typing import Any, Literal, TypeVar

import msgspec

from flowmesh.topics.codec import canonical
from flowmesh.topics.operators import GroupParams, JoinParams, TokenizeParams
from flowmesh.workers.executors import registry
from flowmesh.workers.executors.base import (
    MAX_FIELD_WIDTH,
    MAX_OUTPUT_BYTES,
    MAX_OUTPUT_RECORDS,
    LimitExceeded,
    OpError,
    OpInput,
    Outcome,
    Record,
    describe_error,
    one_record,
    params_as,
    run_each,
)

TransformKind = Literal["map", "filter"]
F = TypeVar("F", bound=Callable[..., Any])

RECORD_MAX_BATCH = 256  # per-record work is microseconds: big batches amortise the bus
ALL_MAX_BATCH = 4  # all-fanout ops hold whole datasets in memory at once

# --- source hashing ---------------------------------------------------------------------


def _code_fingerprint(code: CodeType, h: Any) -> None:
    # co_code alone misses edits that only change a constant ("a" -> "b") or a name
    # (.upper -> .lower), so hash those too; nested code objects (lambdas, inner defs)
    # recurse because their repr contains a memory address that differs per process.
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _code_fingerprint(const, h)
        elif isinstance(const, frozenset):
            h.update(repr(sorted(map(repr, const))).encode())  # set order varies per process
        else:
            h.update(repr(const).encode())


def source_hash(obj: Any) -> str:
    """First 12 hex digits of the SHA-256 of obj's source (a function, class or module).
    Falls back to the bytecode when there is no source (functions built by exec)."""
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        if not isinstance(code, CodeType):
            raise TypeError(f"cannot hash the code of {obj!r}: no source, no bytecode") from None
        h = hashlib.sha256()
        _code_fingerprint(code, h)
        return h.hexdigest()[:12]


# --- the registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    name: str
    kind: TransformKind
    fn: Callable[..., Any]
    declared_version: str
    src_hash: str

    @property
    def version(self) -> str:
        return f"{self.declared_version}+{self.src_hash}"

    @property
    def origin(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""


_REGISTRY: registry.Registry[Transform] = registry.Registry("transform")


def transform(name: str, kind: TransformKind, version: str = "1") -> Callable[[F], F]:
    """Register `fn(record, **args)` as transform `name`.

    kind "map": returns the new record (a dict). kind "filter": returns a bool, True to
    keep the record. `version` is yours to bump for changes the source hash cannot see
    (a data file the transform reads, a library upgrade)."""
    if kind not in ("map", "filter"):
        raise ValueError(f"transform kind must be 'map' or 'filter', not {kind!r}")
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"bad transform name {name!r}")

    def register(fn: F) -> F:
        _REGISTRY.add(name, Transform(name, kind, fn, version, source_hash(fn)))
        return fn

    return register


def get_transform(name: str) -> Transform:
    return _REGISTRY.lookup(name)


def registered() -> dict[str, Transform]:
    """A snapshot of the registry, name -> Transform."""
    return dict(_REGISTRY)


load_plugins = registry.load_plugins  # transforms and tools alike


# --- built-in transforms ----------------------------------------------------------------


def _text(record: Record, field: str) -> str:
    value = record[field]  # KeyError -> "record has no field ..."
    if not isinstance(value, str):
        raise TypeError(f"field {field!r} is {type(value).__name__}, expected str")
    return value


def _with(record: Record, field: str, value: Any) -> Record:
    out = dict(record)
    out[field] = value
    return out


@transform("text.upper", "map")
def text_upper(record: Record, field: str = "text") -> Record:
    """Upper-case a text field."""
    return _with(record, field, _text(record, field).upper())


@transform("text.lower", "map")
def text_lower(record: Record, field: str = "text") -> Record:
    """Lower-case a text field."""
    return _with(record, field, _text(record, field).lower())


@transform("text.strip", "map")
def text_strip(record: Record, field: str = "text") -> Record:
    """Remove leading and trailing whitespace from a text field."""
    return _with(record, field, _text(record, field).strip())


@transform("text.normalize", "map")
def text_normalize(record: Record, field: str = "text") -> Record:
    """Lower-case, collapse runs of whitespace to one space, strip the ends."""
    return _with(record, field, " ".join(_text(record, field).lower().split()))


class _FieldsOnlyFormatter(string.Formatter):
    # Templates come from tenants' workflow specs: allow {field} and {field[key]}, but
    # not attribute access ({x.__class__...}), which can walk into interpreter objects.
    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if "." in re.sub(r"\[[^\]]*\]", "", field_name):
            raise ValueError(f"attribute access is not allowed in templates: {{{field_name}}}")
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        # widths and precisions come from tenants: `{text:>100000000}` is a 100 MB record
        for number in re.findall(r"\d+", format_spec):
            if len(number) > 6 or int(number) > MAX_FIELD_WIDTH:
                raise LimitExceeded(
                    f"format spec {format_spec!r}: widths and precisions are limited to "
                    f"{MAX_FIELD_WIDTH}"
                )
        return super().format_field(value, format_spec)


_FORMATTER = _FieldsOnlyFormatter()


@transform("text.template", "map")
def text_template(record: Record, template: str, output_field: str) -> Record:
    """Fill `template` from the record's fields ("Summarise: {text}", str.format syntax)
    and store the result in `output_field`."""
    if not isinstance(template, str):
        raise TypeError(f"template is {type(template).__name__}, expected str")
    _check_template_size(template, record)
    return _with(record, output_field, _FORMATTER.vformat(template, (), record))


def _check_template_size(template: str, record: Record) -> None:
    """Refuse, before building it, a filled template larger than MAX_OUTPUT_BYTES: a
    64 KB template naming a 256 KB field ten thousand times would be 2.5 GB."""
    total = 0
    for literal, field_name, spec, _ in _FORMATTER.parse(template):
        total += len(literal)
        if field_name:
            try:
                value, _ = _FORMATTER.get_field(field_name, (), record)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                continue  # vformat reports it in its own words
            total += len(str(value)) + sum(int(n) for n in re.findall(r"\d{1,6}", spec or ""))
        if total > MAX_OUTPUT_BYTES:
            raise LimitExceeded(f"the filled template would exceed {MAX_OUTPUT_BYTES} bytes")


@transform("text.word_count", "map")
def text_word_count(
    record: Record, field: str = "text", output_field: str = "word_count"
) -> Record:
    """Count whitespace-separated words of a text field into `output_field`."""
    return _with(record, output_field, len(_text(record, field).split()))


@transform("field.rename", "map")
def field_rename(record: Record, mapping: dict[str, str]) -> Record:
    """Rename fields, old -> new; every old name must exist. Other fields keep order."""
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise TypeError("mapping must be an object of old name -> new name")
    missing = [old for old in mapping if old not in record]
    if missing:
        raise KeyError(missing[0])
    return {mapping.get(k, k): v for k, v in record.items()}


@transform("field.select", "map")
def field_select(record: Record, fields: list[str]) -> Record:
    """Keep only `fields`, in that order; every one must exist."""
    if not isinstance(fields, list):
        raise TypeError("fields must be a list of field names")
    return {f: record[f] for f in fields}


@transform("field.set", "map")
def field_set(record: Record, values: dict[str, Any]) -> Record:
    """Set fields to constant values (adding or overwriting)."""
    if not isinstance(values, dict):
        raise TypeError("values must be an object of field -> value")
    return {**record, **values}


@transform("field.min_words", "filter")
def field_min_words(record: Record, min: int, field: str = "text") -> bool:
    """Keep records whose text field has at least `min` whitespace-separated words."""
    return len(_text(record, field).split()) >= min


@transform("text.contains", "filter")
def text_contains(
    record: Record, substring: str, field: str = "text", case_sensitive: bool = False
) -> bool:
    """Keep records whose text field contains `substring`."""
    text = _text(record, field)
    if not isinstance(substring, str):
        raise TypeError(f"substring is {type(substring).__name__}, expected str")
    if case_sensitive:
        return substring in text
    return substring.casefold() in text.casefold()


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@transform("field.compare", "filter")
def field_compare(record: Record, field: str, op: str, value: Any) -> bool:
    """Keep records where `record[field] <op> value`, op one of == != < <= > >=."""
    if op not in _COMPARE:
        raise ValueError(f"op must be one of {' '.join(_COMPARE)}, not {op!r}")
    return bool(_COMPARE[op](record[field], value))  # str < int -> TypeError -> OpError


@transform("field.exists", "filter")
def field_exists(record: Record, field: str) -> bool:
    """Keep records that have `field` with a non-null value."""
    return record.get(field) is not None


# --- executors: shared plumbing ---------------------------------------------------------


# --- map / filter -----------------------------------------------------------------------


def param_signature(sig: inspect.Signature) -> dict[str, tuple[str, bool]]:
    """name -> (annotation as written, required) for every parameter after the record."""
    out: dict[str, tuple[str, bool]] = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        text = (
            "Any"
            if ann is p.empty
            else ann
            if isinstance(ann, str)
            else getattr(ann, "__name__", str(ann))
        )
        out[p.name] = (str(text), p.default is p.empty)
    return out


class _TransformExecutor:
    max_batch = RECORD_MAX_BATCH

    def __init__(self, fn_name: str, kind: TransformKind) -> None:
        self._t = get_transform(fn_name)
        if self._t.kind != kind:
            raise ValueError(f"transform {fn_name!r} is a {self._t.kind}, not a {kind}")
        self._signature = inspect.signature(self._t.fn)

    @property
    def id(self) -> str:
        return f"{self._t.kind}.{self._t.name}"

    @property
    def kind(self) -> str:
        return self._t.kind

    @property
    def version(self) -> str:
        return self._t.version

    @property
    def signature(self) -> dict[str, tuple[str, bool]]:
        """Its parameters past the record, name -> (type name, required): workers
        advertise it so a submission's params are checked before anything runs."""
        return param_signature(self._signature)

    def _call(self, record: Record, args: dict[str, Any]) -> Any:
        name = self._t.name
        try:
            # bind first, so wrong args are reported as such, not as a bug in the body
            self._signature.bind(record, **args)
        except TypeError as exc:
            raise OpError(
                f"transform {name!r}: bad args {sorted(args)}: {exc}; "
                f"signature is {name}{self._signature}"
            ) from exc
        try:
            # a copy: a transform that mutates its input must not affect other
            # operators of the batch that were handed the same record object
            return self._t.fn(copy.deepcopy(record), **args)
        except LimitExceeded as exc:  # the same params would only fail again
            raise OpError(f"transform {name!r} failed: {exc}", permanent=True) from exc
        except Exception as exc:  # user code: any failure on this input is this op's
            raise OpError(f"transform {name!r} failed: {describe_error(exc)}") from exc

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._run_one)

    def _run_one(self, op: OpInput) -> list[Record]:
        raise NotImplementedError


class MapExecutor(_TransformExecutor):
    """Runs a registered map transform on each operator's one record."""

    def __init__(self, fn_name: str) -> None:
        super().__init__(fn_name, "map")

    def _run_one(self, op: OpInput) -> list[Record]:
        out = self._call(one_record(op), op.params)
        if not isinstance(out, dict):
            raise OpError(f"transform {self._t.name!r} returned {type(out).__name__}, not a record")
        try:
            canonical(out)  # fail here, for this op, rather than when the runtime stores it
        except (TypeError, msgspec.EncodeError) as exc:
            raise OpError(f"transform {self._t.name!r} returned a non-JSON record: {exc}") from exc
        return [out]


class FilterExecutor(_TransformExecutor):
    """Runs a registered predicate: keeps the one record or drops it."""

    def __init__(self, fn_name: str) -> None:
        super().__init__(fn_name, "filter")

    def _run_one(self, op: OpInput) -> list[Record]:
        record = one_record(op)
        keep = self._call(record, op.params)
        if not isinstance(keep, bool):
            raise OpError(f"filter {self._t.name!r} returned {type(keep).__name__}, not a bool")
        return [record] if keep else []


# --- tokenize / join / group ------------------------------------------------------------


class _BuiltinExecutor:
    """id/kind/version for a built-in kind; version = "1+<hash of the class source>"."""

    kind_name = ""
    declared_version = "1"

    @property
    def id(self) -> str:
        return self.kind_name

    @property
    def kind(self) -> str:
        return self.kind_name

    @property
    def version(self) -> str:
        return f"{self.declared_version}+{source_hash(type(self))}"


_WORD_RE = re.compile(r"\w+")


class TokenizeExecutor(_BuiltinExecutor):
    """Split a text field into tokens: whitespace, words (regex \\w+) or characters."""

    kind_name = "tokenize"
    max_batch = RECORD_MAX_BATCH

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._one)

    def _one(self, op: OpInput) -> list[Record]:
        p: TokenizeParams = params_as(self.id, TokenizeParams, op.params)
        record = one_record(op)
        text = record.get(p.field)
        if not isinstance(text, str):
            got = "missing" if p.field not in record else type(text).__name__
            raise OpError(f"tokenize: field {p.field!r} is {got}, expected str")
        if p.lowercase:
            text = text.lower()
        if p.mode == "whitespace":
            tokens = text.split()
        elif p.mode == "words":
            tokens = _WORD_RE.findall(text)
        else:
            tokens = list(text)
        return [{**record, p.output_field: tokens, "n_tokens": len(tokens)}]


class JoinExecutor(_BuiltinExecutor):
    """Join two datasets on field `on` (inner or left).

    Keys match when their JSON values are equal (1 and 1.0, or 1 and true, do not).
    Records without the field (or with null) match nothing. A merged record is the left
    record updated by the right one, keeping the left key. Output: left records in
    order; for each, its matches in right order (left join: the unmatched left record)."""

    kind_name = "join"
    max_batch = ALL_MAX_BATCH

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._one)

    def _one(self, op: OpInput) -> list[Record]:
        p: JoinParams = params_as(self.id, JoinParams, op.params)
        if len(op.inputs) != 2:
            raise OpError(f"join needs 2 inputs (left, right), got {len(op.inputs)}")
        left, right = op.inputs
        index: dict[bytes, list[Record]] = {}
        for rec in right:
            if rec.get(p.on) is not None:
                index.setdefault(canonical(rec[p.on]), []).append(rec)
        out: list[Record] = []
        for rec in left:
            key = rec.get(p.on)
            matches = index.get(canonical(key), []) if key is not None else []
            # counted before the records are built: 82 KB of keys that all match make
            # 4M records (852 MB)
            if len(out) + len(matches) > MAX_OUTPUT_RECORDS:
                raise OpError(
                    f"join: more than {MAX_OUTPUT_RECORDS} output records (one operator's "
                    "limit); join on a more selective field",
                    permanent=True,
                )
            out.extend({**rec, **m, p.on: key} for m in matches)
            if not matches and p.how == "left":
                out.append(rec)
        return out


class GroupExecutor(_BuiltinExecutor):
    """Group records by field `by` and aggregate: count, collect (values of `field`, or
    whole records when no field), sum or mean of `field`. Records without `by` form the
    null group. One output record per group, sorted by str(group value)."""

    kind_name = "group"
    max_batch = ALL_MAX_BATCH

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._one)

    def _one(self, op: OpInput) -> list[Record]:
        p: GroupParams = params_as(self.id, GroupParams, op.params)
        if len(op.inputs) != 1:
            raise OpError(f"group needs 1 input, got {len(op.inputs)}")
        out_name = "items" if p.agg == "collect" else p.agg
        if p.by == out_name:
            raise OpError(f"group: by={p.by!r} clashes with the {p.agg} output field")
        if p.agg in ("sum", "mean") and p.field is None:
            raise OpError(f"group: agg {p.agg!r} needs `field`")
        groups: dict[bytes, tuple[Any, list[Record]]] = {}
        for rec in op.inputs[0]:
            value = rec.get(p.by)
            groups.setdefault(canonical(value), (value, []))[1].append(rec)
        # str form first (the documented order); canonical bytes break ties such as
        # 1 vs "1" so the order never depends on input order
        ordered = sorted(groups.items(), key=lambda kv: (str(kv[1][0]), kv[0]))
        return [{p.by: value, out_name: self._agg(p, recs)} for _, (value, recs) in ordered]

    @staticmethod
    def _agg(p: GroupParams, recs: list[Record]) -> Any:
        if p.agg == "count":
            return len(recs)
        if p.field is None:  # collect without a field: whole records
            return recs
        values = []
        for rec in recs:
            if p.field not in rec:
                raise OpError(f"group: a record in group {rec.get(p.by)!r} has no {p.field!r}")
            value = rec[p.field]
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if p.agg != "collect" and not is_number:
                raise OpError(f"group: {p.agg} of {p.field!r} needs numbers, got {value!r}")
            values.append(value)
        if p.agg == "collect":
            return values
        total = sum(values)
        return total if p.agg == "sum" else total / len(values)
