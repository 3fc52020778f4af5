"""matplotlib, when the `plots` extra is installed: the only part of FlowMesh that draws."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any


def pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None (with one line on stderr
    saying how to get it) when matplotlib is not installed: the JSON and Markdown results
    are written either way."""
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "plots skipped: matplotlib is not installed (pip install 'flowmesh-fabric[plots]')",
            file=sys.stderr,
        )
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
