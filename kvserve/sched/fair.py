"""Fair shares between tenants: weighted max-min division of a step's tokens, and weighted fair
queuing of admissions. Pure Python (no torch).

A step has a token budget (--max-num-batched-tokens). When two or more tenants have work, each
gets at most its weighted share of it (`fair_caps`): tenants asking for less than their share keep
what they ask, and what they leave is divided again among the others, in proportion to weight
(water-filling). No token is left unused while anyone asks for it, so one tenant alone still gets
the whole step.

Admission interleaves tenants by virtual time (`VirtualClock`): each tenant's tokens served
divided by its weight. The tenant furthest behind goes next, within the same lane and priority.
A tenant that comes back after being idle starts at the slowest active tenant's time, so idleness
does not build up credit for a later burst.
"""

from __future__ import annotations

import math


def fair_caps(demands: dict, weights: dict, budget: int, behind: dict | None = None) -> dict:
    """Each key's whole-token cap: min(demand, weighted max-min share of `budget`). The caps sum to
    min(budget, total demand). Rounding: floors first, then leftover tokens one by one to the keys
    furthest behind (`behind`: key → virtual time, the least first; absent keys count as 0), then
    to those with the largest fractional part, ties by key order.

    Passing the virtual times matters when the budget is smaller than the number of keys with
    work: every share is then under one token, and without them the same keys would take the
    leftover tokens step after step while the others starved."""
    caps = {key: 0.0 for key in demands}
    active = {key for key, demand in demands.items() if demand > 0}
    left = float(budget)
    while active and left > 1e-9:
        total_weight = sum(weights[key] for key in active)
        share = {key: left * weights[key] / total_weight for key in active}
        satisfied = {key for key in active if demands[key] - caps[key] <= share[key]}
        if not satisfied:
            for key in active:
                caps[key] += share[key]
            break
        for key in satisfied:
            left -= demands[key] - caps[key]
            caps[key] = float(demands[key])
        active -= satisfied
    whole = {key: math.floor(cap + 1e-9) for key, cap in caps.items()}
    spare = min(budget, sum(demands.values())) - sum(whole.values())
    behind = behind or {}
    wanting = [key for key in caps if whole[key] < demands[key]]
    for key in sorted(wanting, key=lambda k: (behind.get(k, 0.0), whole[k] - caps[k]))[:max(0, spare)]:
        whole[key] = min(demands[key], whole[key] + 1)
    return whole


class VirtualClock:
    """Tokens served per tenant, divided by weight."""

    def __init__(self) -> None:
        self.time: dict = {}

    def activate(self, tenant, active: set) -> None:
        """`tenant` has work again: it starts no earlier than the slowest tenant still active."""
        others = [self.time[t] for t in active if t != tenant and t in self.time]
        floor = min(others) if others else 0.0
        self.time[tenant] = max(self.time.get(tenant, 0.0), floor)

    def charge(self, tenant, num_tokens: int, weight: float) -> None:
        self.time[tenant] = self.time.get(tenant, 0.0) + num_tokens / weight

    def forget_idle(self, active: set) -> None:
        """Idle tenants' times are dropped (activate restores a fair start), so the map stays small."""
        for tenant in [t for t in self.time if t not in active]:
            del self.time[tenant]
