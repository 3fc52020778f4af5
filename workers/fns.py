"""The table of built-in `fn`s (transforms for map/filter, tools for tool nodes) and their
parameters, generated from the registries: `flowmesh-worker --list-fns` prints it, the
README carries it, and tests/test_public_api.py keeps the two equal."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flowmesh.workers.executors.tool import registered_tools
from flowmesh.workers.executors.transform import registered


def _params(fn: Callable[..., Any]) -> str:
    out = []
    for p in list(inspect.signature(fn).parameters.values())[1:]:  # past the record
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        kind = "" if ann is p.empty else f": {ann if isinstance(ann, str) else ann.__name__}"
        default = "" if p.default is p.empty else f" = {p.default!r}"
        out.append(f"`{p.name}{kind}{default}`")
    return (", ".join(out) or "(none)").replace("|", "\\|")


def _first_line(doc: str) -> str:
    """The docstring's first sentence, on one line."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    end = text.find(". ")
    return (text if end < 0 else text[: end + 1]).replace("|", "\\|")


def fn_table() -> str:
    """Markdown: one row per registered transform and tool, by op then name."""
    rows = ["| op | fn | parameters | what it does |", "|---|---|---|---|"]
    for name, t in sorted(registered().items(), key=lambda kv: (kv[1].kind, kv[0])):
        rows.append(f"| `{t.kind}` | `{name}` | {_params(t.fn)} | {_first_line(t.doc)} |")
    for name, tool in sorted(registered_tools().items()):
        rows.append(f"| `tool` | `{name}` | {_params(tool.fn)} | {_first_line(tool.doc)} |")
    return "\n".join(rows) + "\n"
