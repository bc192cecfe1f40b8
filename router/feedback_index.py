"""Which experiment and arm served a request id, for joining feedback to it later.

Bounded: entries expire after a TTL and the oldest are dropped beyond a size cap, and the index
counts both kinds of drop so an operator can tell "never served" from "forgotten"."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ServedBy:
    experiment: str
    arm: str
    served_at: float
    feedback_given: bool = False


class FeedbackIndex:
    def __init__(self, ttl_s: float = 86_400.0, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError(f"feedback index needs ttl_s > 0 and max_entries >= 1, got {ttl_s}, {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, ServedBy] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self.dropped_expired = 0
        self.dropped_over_capacity = 0

    def remember(self, request_id: str, experiment: str, arm: str) -> None:
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._entries[request_id] = ServedBy(experiment, arm, now)
            self._entries.move_to_end(request_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.dropped_over_capacity += 1

    def peek(self, request_id: str) -> ServedBy | None:
        with self._lock:
            self._expire(self._clock())
            return self._entries.get(request_id)

    def claim(self, request_id: str) -> tuple[ServedBy, bool] | None:
        """The entry and whether this is its first feedback (later ones are duplicates); None
        for an id never served by an experiment, expired or dropped."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(request_id)
            if entry is None:
                return None
            first = not entry.feedback_given
            entry.feedback_given = True
            return entry, first

    def forget_experiment(self, experiment: str) -> None:
        with self._lock:
            for request_id in [rid for rid, entry in self._entries.items() if entry.experiment == experiment]:
                del self._entries[request_id]

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> dict:
        return {
            "entries": len(self._entries),
            "ttl_s": self.ttl_s,
            "max_entries": self.max_entries,
            "dropped_expired": self.dropped_expired,
            "dropped_over_capacity": self.dropped_over_capacity,
        }

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.served_at < self.ttl_s:
                return
            self._entries.popitem(last=False)
            self.dropped_expired += 1
