"""Reading the cache: the fm_ops entries a selector matches, and counts over them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.js.errors import KeyNotFoundError

from flowmesh.topics import Bus, codec, streams
from flowmesh.topics.codec import is_digest
from flowmesh.topics.messages import OpState


class CacheError(ValueError):
    pass


@dataclass(frozen=True)
class Selector:
    """Which cache entries a call means. `key` is an operator key or a prefix of one."""

    key: str | None = None
    kind: str | None = None
    executor: str | None = None
    version: str | None = None
    state: str | None = None

    def empty(self) -> bool:
        return not any((self.key, self.kind, self.executor, self.version, self.state))

    def matches(self, op: OpState) -> bool:
        return (
            (self.key is None or op.key.startswith(self.key))
            and (self.kind is None or op.spec.kind == self.kind)
            and (self.executor is None or op.spec.executor == self.executor)
            and (self.version is None or op.spec.version == self.version)
            and (self.state is None or op.state == self.state)
        )


# --- reading the KV -------------------------------------------------------------------


async def op_entries(bus: Bus, sel: Selector) -> list[tuple[OpState, int]]:
    kv = await bus.kv(streams.KV_OPS)
    if sel.key is not None and is_digest(sel.key):
        try:
            entry = await kv.get(sel.key)
        except KeyNotFoundError:
            return []
        rows = [(sel.key, entry.value, entry.revision or 0)] if entry.value else []
    else:
        rows = await bus.kv_items(streams.KV_OPS)
    out = []
    for _key, value, revision in rows:
        try:
            op = codec.decode(value, OpState)
        except codec.DecodeError:
            continue  # not ours to judge here; gc and the planner report such entries
        if sel.matches(op):
            out.append((op, revision))
    out.sort(key=lambda pair: pair[0].created_at)
    return out


async def entries(
    bus: Bus,
    *,
    key: str | None = None,
    kind: str | None = None,
    executor: str | None = None,
    version: str | None = None,
    state: str | None = None,
) -> list[OpState]:
    """The cache entries (operator KV values) that match every given filter, oldest
    first. `key` is an operator key or a prefix of one."""
    sel = Selector(key, kind, executor, version, state)
    return [op for op, _ in await op_entries(bus, sel)]


# --- stats ----------------------------------------------------------------------------


@dataclass
class StatsRow:
    kind: str
    executor: str
    version: str
    entries: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    outputs: int = 0
    device_seconds: float = 0.0
    cost_usd: float = 0.0
    energy_j: float = 0.0


@dataclass
class CacheStats:
    rows: list[StatsRow] = field(default_factory=list)  # one per kind + executor@version
    entries: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    by_executor: dict[str, int] = field(default_factory=dict)  # "executor@version" -> n
    device_seconds: float = 0.0
    cost_usd: float = 0.0
    energy_j: float = 0.0


def summarize(ops: Iterable[OpState]) -> CacheStats:
    st = CacheStats()
    rows: dict[tuple[str, str, str], StatsRow] = {}
    for op in ops:
        sp = op.spec
        row = rows.setdefault(
            (sp.kind, sp.executor, sp.version), StatsRow(sp.kind, sp.executor, sp.version)
        )
        row.entries += 1
        setattr(row, op.state, getattr(row, op.state) + 1)
        row.outputs += op.n_outputs
        row.device_seconds += op.device_seconds
        row.cost_usd += op.cost_usd
        row.energy_j += op.energy_j
        st.entries += 1
        st.by_state[op.state] = st.by_state.get(op.state, 0) + 1
        st.by_kind[sp.kind] = st.by_kind.get(sp.kind, 0) + 1
        ev = f"{sp.executor}@{sp.version}"
        st.by_executor[ev] = st.by_executor.get(ev, 0) + 1
        st.device_seconds += op.device_seconds
        st.cost_usd += op.cost_usd
        st.energy_j += op.energy_j
    st.rows = sorted(rows.values(), key=lambda r: (r.kind, r.executor, r.version))
    return st


async def stats(
    bus: Bus,
    *,
    key: str | None = None,
    kind: str | None = None,
    executor: str | None = None,
    version: str | None = None,
    state: str | None = None,
) -> CacheStats:
    """Counts per kind, executor@version and state, and the device time and cost the
    matching entries took to compute."""
    return summarize(
        await entries(bus, key=key, kind=kind, executor=executor, version=version, state=state)
    )
