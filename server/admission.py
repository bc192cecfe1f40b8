"""Admission: which waiting requests start as rows at the top of each engine step.

Waiting requests sit in a FairQueue (priority first, tenants in turn). Each step walks it in that
order and starts a row for every request that has room: a free row under `max_running`, room under
its tenant's row limit, and its adapter in a slot (or a slot it can take now). A request that
cannot start yet stays queued and the walk goes on, so one adapter waiting for a slot or one
tenant at its limit does not hold up anyone else.

A request whose tenant had no row in the previous step starts as a newcomer: its prefill goes
before other tenants' new prompts (server.prefill_order), so a flood's replacement rows do not
delay the first token of someone who was not running at all.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.adapter_registry import AdapterInfo
from server.adapter_tiers import AdapterUnavailableError
from server.batch_state import Row
from server.engine_errors import QueueFullError, TenantQueueFullError
from server.fair_queue import FairQueue, TenantLimitTable
from server.request_handle import GenerationRequest, RequestHandle


@dataclass
class Pending:
    request: GenerationRequest
    handle: RequestHandle
    adapter: AdapterInfo | None


class AdmissionLimits(Protocol):
    """The engine's config, read at each use (a running server's limits may be changed)."""

    max_running: int
    max_queued: int
    tenant_limits: TenantLimitTable


class Admission:
    def __init__(self, limits: AdmissionLimits, lock: threading.RLock) -> None:
        self._limits = limits
        self._lock = lock  # the engine's: guards the queue against submits from other threads
        self._queue: FairQueue[Pending] = FairQueue(
            lambda pending: pending.request.tenant, limits.tenant_limits, priority_of=lambda pending: pending.request.priority
        )
        self._tenants_in_last_step: set[str] = set()

    def check_room(self, tenant: str) -> None:
        """Raise if the queue, or `tenant`'s share of it, has no room for one more request.
        Call under the engine's lock, with the `enqueue` that follows."""
        if len(self._queue) >= self._limits.max_queued:
            raise QueueFullError(self._limits.max_queued)
        tenant_limit = self._queue.queue_limit_reached(tenant)
        if tenant_limit is not None:
            raise TenantQueueFullError(tenant, tenant_limit)

    def enqueue(self, pending: Pending) -> None:
        """Under the engine's lock, after `check_room`."""
        self._queue.append(pending)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Pending]:
        """The waiting requests in admission order (under the engine's lock)."""
        return iter(self._queue)

    def drain(self) -> list[Pending]:
        """Every waiting request; the queue is empty after (under the engine's lock)."""
        return self._queue.drain()

    def admit(
        self,
        rows: Sequence[Row],
        slot_for: Callable[[AdapterInfo], int | None],
        start: Callable[[Pending, int, bool], None],
        end: Callable[[Pending, str, str | None], None],
    ) -> None:
        """Start rows for the waiting requests that have room, in admission order.

        `rows` is the running batch (`start` appends to it); `slot_for` gives an adapter's slot,
        None while it must wait for one, or raises AdapterUnavailableError; `start(pending, slot,
        newcomer)` makes the row; `end(pending, reason, error)` ends a request that will never run
        (cancelled while waiting, or its adapter cannot be loaded)."""
        with self._lock:
            waiting = list(self._queue)
        taken: set[int] = set()
        running = Counter(row.request.tenant for row in rows)
        for row in rows:
            row.newcomer = False  # precedence is for a newcomer's first step only
        try:
            for pending in waiting:
                if pending.handle.cancelled:
                    taken.add(id(pending))
                    end(pending, "cancelled", None)
                    continue
                if len(rows) >= self._limits.max_running:
                    break
                tenant = pending.request.tenant
                if not self._queue.may_run(tenant, running[tenant]):
                    continue  # at its row limit: other tenants go ahead
                try:
                    slot = -1 if pending.adapter is None else slot_for(pending.adapter)
                except AdapterUnavailableError as err:
                    taken.add(id(pending))
                    end(pending, "error", str(err))
                    continue
                if slot is None:
                    continue  # waits for its own adapter; others go ahead
                start(pending, slot, tenant not in self._tenants_in_last_step)
                taken.add(id(pending))  # only once it has its row: else it stays queued
                running[tenant] += 1
                self._queue.served(pending)
        finally:
            # Whatever happens mid-way, what was started or ended leaves the queue exactly once.
            if taken:
                with self._lock:
                    self._queue.remove(taken)
            self._tenants_in_last_step = {row.request.tenant for row in rows}  # the batch about to step
