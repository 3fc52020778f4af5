"""Weighted fair share, priorities and budgets across tenants (pure; time is passed in)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TenantPolicy:
    weight: float = 1.0  # share of the fleet relative to other active tenants
    priority: float = 0.0  # added to the utility of its batches
    budget_usd: float | None = None  # past it, its operators wait (they are not dropped)


_DEFAULT = TenantPolicy()


@dataclass
class FairShare:
    """Weighted fair share over decayed device-seconds per tenant.

    A tenant's deficit is log(due / got): `due` its weight's share of the tenants with
    ready work, `got` its share of their recent usage (floored at `floor` x due). 0 at
    its share, positive below it, up to log(1 / floor) (4.6 by default) for a tenant
    that got nothing yet, negative above it. Scaled by the utility's fairness weight it
    outweighs a batch-size advantage: a tenant with 5 ready operators is served before
    the next batch of a tenant with a backlog of thousands that has had the fleet (a
    5-operator batch loses about 2.4 points of throughput and cost to a 256-operator
    one). A bounded share difference (due - got, at most 1) could not: the small tenant
    waited for the whole backlog."""

    policies: Mapping[str, TenantPolicy] = field(default_factory=dict)
    half_life_s: float = 300.0
    floor: float = 0.01
    usage: dict[str, float] = field(default_factory=dict)
    spent_usd: dict[str, float] = field(default_factory=dict)
    _at: float = 0.0

    def policy(self, tenant: str) -> TenantPolicy:
        # one shared default (frozen): built per call it was most of a round's reads
        return self.policies.get(tenant, _DEFAULT)

    def _decay_to(self, now: float) -> None:
        if now > self._at:
            factor = math.pow(0.5, (now - self._at) / self.half_life_s)
            for t in self.usage:
                self.usage[t] *= factor
            self._at = now

    def charge(self, tenant: str, device_s: float, cost_usd: float, now: float) -> None:
        self._decay_to(now)
        self.usage[tenant] = self.usage.get(tenant, 0.0) + device_s
        self.spent_usd[tenant] = self.spent_usd.get(tenant, 0.0) + cost_usd

    def deficits(self, tenants: Iterable[str], now: float) -> dict[str, float]:
        self._decay_to(now)
        active = sorted(set(tenants))
        if not active:
            return {}
        total_w = sum(self.policy(t).weight for t in active) or 1.0
        total_u = sum(self.usage.get(t, 0.0) for t in active)
        out = {}
        for t in active:
            due = self.policy(t).weight / total_w
            got = self.usage.get(t, 0.0) / total_u if total_u > 0 else due
            out[t] = math.log(due / max(got, self.floor * due)) if due > 0 else 0.0
        return out

    def over_budget(self, tenant: str) -> bool:
        budget = self.policy(tenant).budget_usd
        return budget is not None and self.spent_usd.get(tenant, 0.0) >= budget
