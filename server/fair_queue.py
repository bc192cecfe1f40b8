"""Waiting requests per tenant, admitted round-robin, with per-tenant limits.

One tenant flooding the server must not decide when another tenant's request runs. Each tenant
has its own line; admission takes one request from each tenant with waiting work in turn,
starting after the tenant served last. Limits per tenant (from its API key, else the server's
defaults) cap its running rows, so a row stays free for a newcomer instead of waiting for a long
generation to end, and its queued requests, so it cannot fill the queue everyone shares.
"""

from __future__ import annotations

from collections import deque
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
    def __init__(self, tenant_of: Callable[[Item], str], limits: TenantLimitTable | None = None) -> None:
        self._tenant_of = tenant_of
        self.limits = limits or TenantLimitTable()
        self._lines: dict[str, deque[Item]] = {}  # tenant -> its waiting requests, oldest first
        self._rotation: list[str] = []  # tenants in the order they take turns
        self._last_served: str | None = None

    def append(self, item: Item) -> None:
        tenant = self._tenant_of(item)
        if tenant not in self._lines:
            self._lines[tenant] = deque()
            self._rotation.append(tenant)
        self._lines[tenant].append(item)

    def queued(self, tenant: str) -> int:
        return len(self._lines.get(tenant, ()))

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
        return sum(len(line) for line in self._lines.values())

    def __iter__(self) -> Iterator[Item]:
        """Admission order: each tenant's oldest, in turn from the tenant after the last served,
        then each tenant's second oldest, and so on."""
        tenants = self._rotation
        start = tenants.index(self._last_served) + 1 if self._last_served in tenants else 0
        order = [self._lines[t] for t in tenants[start:] + tenants[:start]]
        for depth in range(max((len(line) for line in order), default=0)):
            for line in order:
                if depth < len(line):
                    yield line[depth]

    def remove(self, item_ids: set[int]) -> None:
        """Drop the items whose id() is in `item_ids` (admitted or ended)."""
        for tenant in list(self._lines):
            line = deque(item for item in self._lines[tenant] if id(item) not in item_ids)
            if line:
                self._lines[tenant] = line
            else:
                del self._lines[tenant]
                self._rotation.remove(tenant)

    def drain(self) -> list[Item]:
        """Every waiting item (in admission order); the queue is empty after."""
        items = list(self)
        self._lines.clear()
        self._rotation.clear()
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
