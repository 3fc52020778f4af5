"""Whole-number settings read from the environment, checked the same way everywhere (a
deployment sets them once, in a ConfigMap or a unit file, for every component)."""

from __future__ import annotations

import os


def env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """$name as a whole number in [low, high], `default` when unset or empty; anything
    else is a ValueError naming the variable, so a typo stops a component at start."""
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}={raw!r} must be {bounds}")
    return value
