"""Tools for agent steps, and the `tool` executor that runs them (one per tool).

A `tool` node names a registered Python tool (`fn`); its params are the tool's keyword
arguments. A tool is `fn(record, **args) -> dict`: the record plus what the tool adds.
Register one with the `@tool` decorator, in this module or in a plugin module loaded with
`load_tool_plugins` (the workers' `--plugin` list loads transforms and tools alike):

    from flowmesh.workers.executors.tool import tool

    @tool("web.fetch", deterministic=False)
    def fetch(record, url_field="url"): ...

Versions work like transforms' (declared + a hash of the function's source), and a tool
declared `deterministic=False` (it reads the clock, a random source, the network) gets
topics.operators.NONDETERMINISTIC appended: the planner then salts its operators' keys
with a per-request nonce, so a non-deterministic result is never shared or reused.
Only the tool function's own source is hashed, which is why the built-ins below keep
their helpers inside themselves.
"""

from __future__ import annotations

import ast
import copy
import datetime
import inspect
import math
import operator
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from flowmesh.topics.codec import canonical
from flowmesh.topics.operators import NONDETERMINISTIC
from flowmesh.workers.executors import registry
from flowmesh.workers.executors.base import (
    OpError,
    OpInput,
    Outcome,
    Record,
    describe_error,
    one_record,
    run_each,
)
from flowmesh.workers.executors.transform import source_hash

F = TypeVar("F", bound=Callable[..., Any])

# A tool may wait on something slow (a plugin calling a service): smaller batches than
# map/filter keep one slow batch from holding many operators.
TOOL_MAX_BATCH = 64

# --- the registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    declared_version: str
    src_hash: str
    deterministic: bool

    @property
    def version(self) -> str:
        base = f"{self.declared_version}+{self.src_hash}"
        return base if self.deterministic else base + NONDETERMINISTIC

    @property
    def origin(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""


_TOOLS: registry.Registry[Tool] = registry.Registry("tool")


def tool(name: str, deterministic: bool = True, version: str = "1") -> Callable[[F], F]:
    """Register `fn(record, **args) -> dict` as tool `name`.

    deterministic=False for a tool whose result is not a function of its record and args
    alone: its operators are never deduplicated. `version` is yours to bump for changes
    the source hash cannot see (a helper it calls, a data file, a library upgrade)."""
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"bad tool name {name!r}")

    def register(fn: F) -> F:
        _TOOLS.add(name, Tool(name, fn, version, source_hash(fn), deterministic))
        return fn

    return register


def get_tool(name: str) -> Tool:
    return _TOOLS.lookup(name)


def registered_tools() -> dict[str, Tool]:
    """A snapshot of the registry, name -> Tool."""
    return dict(_TOOLS)


load_tool_plugins = registry.load_plugins


# --- the executor -----------------------------------------------------------------------


class ToolExecutor:
    """Runs one registered tool on each operator's one record."""

    kind = "tool"
    max_batch = TOOL_MAX_BATCH

    def __init__(self, name: str) -> None:
        self._t = get_tool(name)
        self._signature = inspect.signature(self._t.fn)

    @property
    def id(self) -> str:
        return f"tool.{self._t.name}"

    @property
    def version(self) -> str:
        return self._t.version

    def run(self, batch: list[OpInput], model: Any | None = None) -> list[Outcome]:
        return run_each(batch, self._one)

    def _one(self, op: OpInput) -> list[Record]:
        name, record, args = self._t.name, one_record(op), op.params
        try:
            # bind first, so wrong args are reported as such, not as a bug in the tool
            self._signature.bind(record, **args)
        except TypeError as exc:
            raise OpError(
                f"tool {name!r}: bad args {sorted(args)}: {exc}; "
                f"signature is {name}{self._signature}"
            ) from exc
        try:
            # a copy: a tool that mutates its input must not reach other operators of
            # the batch that were handed the same record object
            out = self._t.fn(copy.deepcopy(record), **args)
        except Exception as exc:  # tool code: any failure on this input is this op's
            raise OpError(f"tool {name!r} failed: {describe_error(exc)}") from exc
        if not isinstance(out, dict):
            raise OpError(f"tool {name!r} returned {type(out).__name__}, not a record")
        try:
            canonical(out)  # fail here, for this op, rather than when the runtime stores it
        except (TypeError, msgspec.EncodeError) as exc:
            raise OpError(f"tool {name!r} returned a non-JSON record: {exc}") from exc
        return [out]


# --- built-in tools ---------------------------------------------------------------------


@tool("calculator")
def calculator(record: Record, field: str = "expression", output_field: str = "result") -> Record:
    """Evaluate the arithmetic in `field` (numbers, + - * / **, unary -, parentheses)
    into `output_field`. The text is parsed with `ast` and only those node types are
    evaluated: there are no names, calls or attributes in this language, so nothing but
    arithmetic can run. Inputs over 1000 characters and results over 4096 bits (or not
    finite, or complex) are refused, so `9**9**9` fails fast instead of hanging."""
    max_chars, max_bits = 1000, 4096
    binary: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.Pow: operator.pow,
    }
    unary: dict[type[ast.unaryop], Callable[[Any], Any]] = {
        ast.UAdd: operator.pos,
        ast.USub: operator.neg,
    }

    def checked(value: Any) -> int | float:
        if isinstance(value, int) and value.bit_length() > max_bits:
            raise ValueError(f"result over {max_bits} bits")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("result is not finite")
        if not isinstance(value, int | float):  # (-8) ** 0.5 is complex
            raise ValueError(f"result is {type(value).__name__}, not a real number")
        return value

    def bound_power(base: int | float, exp: int | float) -> None:
        # an integer power's size is known before computing it: refuse 9**9**9 up front
        # (a float power overflows quickly by itself, with OverflowError)
        if not (isinstance(base, int) and isinstance(exp, int)) or exp <= 0:
            return
        if max(abs(base).bit_length(), 1) * exp > max_bits:
            raise ValueError(f"result over {max_bits} bits")

    def ev(node: ast.expr) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return checked(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in unary:
            return checked(unary[type(node.op)](ev(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in binary:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                bound_power(left, right)
            return checked(binary[type(node.op)](left, right))
        raise ValueError(f"{type(node).__name__} is not allowed: numbers, + - * / ** and ()")

    expression = record[field]
    if not isinstance(expression, str):
        raise TypeError(f"field {field!r} is {type(expression).__name__}, expected str")
    if len(expression) > max_chars:
        raise ValueError(f"expression longer than {max_chars} characters")
    tree = ast.parse(expression.strip(), mode="eval")
    return {**record, output_field: ev(tree.body)}


@tool("lookup")
def lookup(
    record: Record,
    table: dict[str, Any],
    key_field: str = "key",
    output_field: str = "value",
    default: Any = None,
) -> Record:
    """Look `record[key_field]` up in `table` (given in the node's params) and store the
    value, or `default`, in `output_field`. Numbers are looked up by their text, since
    JSON object keys are always strings."""
    if not isinstance(table, dict):
        raise TypeError("table must be an object of key -> value")
    key = record[key_field]
    if isinstance(key, bool) or not isinstance(key, str | int | float):
        raise TypeError(f"key field {key_field!r} is {type(key).__name__}, expected text")
    return {**record, output_field: table.get(str(key), default)}


@tool("clock", deterministic=False)
def clock(record: Record, output_field: str = "now") -> Record:
    """The current UTC time, ISO 8601 with microseconds, in `output_field`."""
    now = datetime.datetime.now(datetime.UTC)
    return {**record, output_field: now.isoformat(timespec="microseconds")}


@tool("random_choice", deterministic=False)
def random_choice(
    record: Record,
    choices: list[Any] | None = None,
    field: str | None = None,
    output_field: str = "choice",
) -> Record:
    """One of `choices` (from the params, or the list in record[`field`]), drawn from
    the OS's random source, in `output_field`."""
    if (choices is None) == (field is None):
        raise ValueError("give exactly one of `choices` or `field`")
    options = choices if choices is not None else record[field]  # type: ignore[index]
    if not isinstance(options, list) or not options:
        raise ValueError("choices must be a non-empty list")
    return {**record, output_field: secrets.choice(options)}
