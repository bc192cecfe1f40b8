"""Waiting requests per tenant, admitted round-robin, with per-tenant limits.

One tenant flooding the server must not decide when another tenant's request runs. Each tenant
has its own line; admission takes one request from each tenant with waiting work in turn,
starting after the tenant served last. Priority comes before turns: a request of a lower priority
value (a live request) goes before any of a higher one (an experiment's shadow copy). Limits per
tenant (from its API key, else the server's defaults) cap its running rows, so a row stays free
for a newcomer instead of waiting for a long generation to end, and its queued requests, so it
cannot fill the queue everyone shares.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class TenantLimits:
    max_running: int | None = None  # rows decoding at once; None = only the engine's max_running
    max_queued: int | None = None  # waiting requests; None = only the engine's max_queued


@dataclass(frozen=True)
class TenantLimitTable:
    default: TenantLimits = TenantLimits()  # tenants without their own entry
    per_tenant: dict[str, TenantLimits] = field(default_factory=dict)

    def of(self, tenant: str) -> TenantLimits:
        return self.per_tenant.get(tenant, self.default)


def fair_share_defaults(max_running: int, max_queued: int) -> TenantLimits:
    """Limits for a tenant whose key sets none, on a server shared by several tenants: a quarter
    of the rows (at least one) and half the queue stay for the others. There is no preemption,
    so a row kept free is what lets a newcomer start at once rather than after a long generation."""
    return TenantLimits(
        max_running=max(1, max_running - max(1, max_running // 4)),
        max_queued=max(1, max_queued // 2),
    )


class FairQueue(Generic[Item]):
    """Waiting items in admission order: lower priority values first; within a priority, each
    tenant's oldest in turn (from the tenant after the one served last), then each tenant's second
    oldest, and so on. One line per (priority, tenant), so the order is read off, never sorted."""

    def __init__(
        self,
        tenant_of: Callable[[Item], str],
        limits: TenantLimitTable | None = None,
        priority_of: Callable[[Item], int] = lambda item: 0,
    ) -> None:
        self._tenant_of = tenant_of
        self._priority_of = priority_of
        self.limits = limits or TenantLimitTable()
        # priority -> tenant -> that tenant's waiting items of that priority, oldest first
        self._levels: dict[int, dict[str, deque[Item]]] = {}
        self._priorities: list[int] = []  # the keys of _levels, sorted (few: live and shadow)
        self._rotation: list[str] = []  # tenants with waiting items, in the order they take turns
        self._queued: Counter[str] = Counter()  # tenant -> waiting items, all priorities
        self._last_served: str | None = None

    def append(self, item: Item) -> None:
        tenant, priority = self._tenant_of(item), self._priority_of(item)
        if priority not in self._levels:
            self._levels[priority] = {}
            bisect.insort(self._priorities, priority)
        if tenant not in self._queued:
            self._rotation.append(tenant)
        self._levels[priority].setdefault(tenant, deque()).append(item)
        self._queued[tenant] += 1

    def queued(self, tenant: str) -> int:
        return self._queued.get(tenant, 0)

    def queue_limit_reached(self, tenant: str) -> int | None:
        """The tenant's queue limit if it has no room for one more request, else None."""
        limit = self.limits.of(tenant).max_queued
        return limit if limit is not None and self.queued(tenant) >= limit else None

    def may_run(self, tenant: str, running: int) -> bool:
        """Whether the tenant may start another row while `running` of its rows decode."""
        limit = self.limits.of(tenant).max_running
        return limit is None or running < limit

    def served(self, item: Item) -> None:
        """`item` was admitted: its tenant goes to the back of the turn order."""
        self._last_served = self._tenant_of(item)

    def __len__(self) -> int:
        return self._queued.total()

    def __iter__(self) -> Iterator[Item]:
        tenants = self._rotation
        start = tenants.index(self._last_served) + 1 if self._last_served in tenants else 0
        turns = tenants[start:] + tenants[:start]
        for priority in self._priorities:
            level = self._levels[priority]
            order = [level[tenant] for tenant in turns if tenant in level]
            for depth in range(max(len(line) for line in order)):
                for line in order:
                    if depth < len(line):
                        yield line[depth]

    def remove(self, item_ids: set[int]) -> None:
        """Drop the items whose id() is in `item_ids` (admitted or ended)."""
        for priority in list(self._priorities):
            level = self._levels[priority]
            for tenant in list(level):
                line = level[tenant]
                kept = deque(item for item in line if id(item) not in item_ids)
                self._queued[tenant] -= len(line) - len(kept)
                if kept:
                    level[tenant] = kept
                else:
                    del level[tenant]
            if not level:
                del self._levels[priority]
                self._priorities.remove(priority)
        for tenant in [tenant for tenant, count in self._queued.items() if count == 0]:
            del self._queued[tenant]
            self._rotation.remove(tenant)

    def drain(self) -> list[Item]:
        """Every waiting item (in admission order); the queue is empty after."""
        items = list(self)
        self._levels.clear()
        self._priorities.clear()
        self._rotation.clear()
        self._queued.clear()
        return items


def limit_table(
    per_tenant: dict[str, tuple[int | None, int | None]],
    max_running: int,
    max_queued: int,
    default: TenantLimits | None = None,
) -> TenantLimitTable:
    """The table for a server with API keys: each tenant's (max_running, max_queued) from its
    key, the gaps filled from `default` (fields left None there: the fair share)."""
    share = fair_share_defaults(max_running, max_queued)
    default = default or TenantLimits()
    filled = TenantLimits(
        default.max_running if default.max_running is not None else share.max_running,
        default.max_queued if default.max_queued is not None else share.max_queued,
    )
    return TenantLimitTable(
        filled,
        {
            tenant: TenantLimits(
                running if running is not None else filled.max_running,
                queued if queued is not None else filled.max_queued,
            )
            for tenant, (running, queued) in per_tenant.items()
        },
    )
