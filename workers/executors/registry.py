"""A name -> registered code table, shared by transforms and tools."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Registered(Protocol):
    @property
    def origin(self) -> str:
        """Where it was defined (module:qualname)."""
        ...


T = TypeVar("T", bound=Registered)


class Registry(dict[str, T]):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, name: str, item: T) -> None:
        old = self.get(name)
        # the same origin again is a module reload; another origin is two plugins
        # claiming one name, which would make results depend on import order
        if old is not None and old.origin != item.origin:
            raise ValueError(f"{self.what} {name!r} is already registered by {old.origin}")
        self[name] = item

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"no {self.what} named {name!r} (known: {sorted(self)})") from None


def load_plugins(modules: Sequence[str]) -> None:
    """Import user modules; their @transform / @tool decorators fill the registries."""
    for module in modules:
        importlib.import_module(module)
