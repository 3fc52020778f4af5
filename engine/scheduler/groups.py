"""Ready operators as the policy reads them: one `ReadyGroup` per batch key (same executor
build, params and model, from any workflow), oldest first, with the sums a round needs
(input bytes, operators per tenant) so a round reads a group without walking it.

A scheduler that keeps its groups as operators come and go (`ReadyPool`) hands them to
`Policy.decide_groups` directly; `group_ready` builds them from a flat list.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter


@dataclass(frozen=True)
class ReadyItem:
    """What the policy sees of one ready operator."""

    key: str
    batch_key: str
    kind: str
    executor: str  # "executor@version": only workers that advertise it may run it
    model: str | None
    model_gb: float
    input_bytes: int
    tenant: str
    workflow_id: str
    ready_at: float
    # when its workflow should be done (its latency budget from arrival); inf: none
    deadline_at: float = math.inf


@dataclass
class ReadyGroup:
    """Ready operators of one batch key, oldest first (ties keep their arrival order)."""

    batch_key: str
    items: list[ReadyItem]
    input_bytes: int = 0
    tenants: Counter[str] = field(default_factory=Counter)
    deadline_at: float = math.inf  # the most pressing of its operators' deadlines
    # added to its utility (the policy's split of tenants far below their share)
    boost: float = 0.0
    # per operator (in `items` order), its tenant: a round charges tenants for the
    # operators it assigns from these names, without reading every operator again
    # (empty: not kept; the round reads the operators)
    tenant_of: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, items: list[ReadyItem]) -> ReadyGroup:
        """A group of `items` (one batch key, already oldest first)."""
        tenant_of = list(map(_tenant, items))
        return cls(
            items[0].batch_key,
            items,
            sum(map(_input_bytes, items)),
            Counter(tenant_of),
            min(map(_deadline_at, items)),
            tenant_of=tenant_of,
        )

    def without(self, tenants: set[str]) -> ReadyGroup | None:
        """This group less the operators of `tenants` (None if nothing is left)."""
        kept = [i for i in self.items if i.tenant not in tenants]
        return ReadyGroup.of(kept) if kept else None


_input_bytes = attrgetter("input_bytes")
_tenant = attrgetter("tenant")
_deadline_at = attrgetter("deadline_at")
_ready_at = attrgetter("ready_at")


def group_ready(items: Iterable[ReadyItem]) -> list[ReadyGroup]:
    """Group by batch key; groups ordered by their oldest operator (ties: input order)."""
    groups: dict[str, list[ReadyItem]] = {}
    for it in sorted(items, key=_ready_at):
        g = groups.get(it.batch_key)
        if g is None:
            groups[it.batch_key] = [it]
        else:
            g.append(it)
    return [ReadyGroup.of(g) for g in groups.values()]


class ReadyPool:
    """Ready operators kept grouped as they arrive and leave, so a scheduler round hands
    the policy its groups without regrouping every held operator."""

    def __init__(self) -> None:
        self._groups: dict[str, ReadyGroup] = {}
        self._where: dict[str, ReadyItem] = {}
        self._seq = 0
        self._order: dict[str, list[tuple[float, int]]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def add(self, item: ReadyItem) -> None:
        if item.key in self._where:
            return
        self._where[item.key] = item
        g = self._groups.get(item.batch_key)
        order = self._order.setdefault(item.batch_key, [])
        self._seq += 1
        at = bisect.bisect_right(order, (item.ready_at, self._seq))
        order.insert(at, (item.ready_at, self._seq))
        if g is None:
            self._groups[item.batch_key] = ReadyGroup(
                item.batch_key,
                [item],
                item.input_bytes,
                Counter({item.tenant: 1}),
                item.deadline_at,
                tenant_of=[item.tenant],
            )
            return
        g.items.insert(at, item)
        g.tenant_of.insert(at, item.tenant)
        g.deadline_at = min(g.deadline_at, item.deadline_at)
        g.input_bytes += item.input_bytes
        g.tenants[item.tenant] += 1

    def remove(self, key: str) -> ReadyItem | None:
        item = self._where.pop(key, None)
        if item is None:
            return None
        g = self._groups[item.batch_key]
        at = g.items.index(item)
        del g.items[at]
        del g.tenant_of[at]
        del self._order[item.batch_key][at]
        g.input_bytes -= item.input_bytes
        g.tenants[item.tenant] -= 1
        if g.tenants[item.tenant] <= 0:
            del g.tenants[item.tenant]
        if not g.items:
            del self._groups[item.batch_key]
            del self._order[item.batch_key]
        return item

    def groups(self) -> list[ReadyGroup]:
        """The groups, oldest head first (the order `group_ready` gives)."""
        return sorted(self._groups.values(), key=lambda g: g.items[0].ready_at)

    def items(self) -> Sequence[ReadyItem]:
        return list(self._where.values())
