"""Parsed adapter weights kept in CPU memory, least recently used first out.

The middle tier between the disk and the resident slots: a request whose adapter is here is one
tensor copy away from a slot; one that is not waits for a disk read. Thread-safe, because loads
finish on a background thread while the engine's worker reads.

A held key (an adapter version an experiment pins) is never evicted: its folder may be overwritten
after registration, so this copy may be the last of those bytes. Held entries count against
`max_entries` like any other; the caller holds fewer than `max_entries` keys, so there is always
an entry left for the adapters in rotation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol


class SizedWeights(Protocol):
    @property
    def nbytes(self) -> int: ...


class CpuAdapterCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._held: set[str] = set()  # keys eviction skips, present yet or not
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        """The weights of `key` (marked most recently used), or None."""
        with self._lock:
            weights = self._entries.get(key)
            if weights is not None:
                self._entries.move_to_end(key)
            return weights

    def put(self, key: str, weights: SizedWeights) -> list[str]:
        """Keep `weights` under `key`; returns the keys evicted to stay within `max_entries`
        (the least recently used ones not held)."""
        with self._lock:
            self._entries[key] = weights
            self._entries.move_to_end(key)
            overflow = len(self._entries) - self.max_entries
            evicted = [old_key for old_key in self._entries if old_key not in self._held][: max(overflow, 0)]
            for old_key in evicted:
                del self._entries[old_key]
            return evicted

    def hold(self, key: str) -> None:
        """Never evict `key` (now, or once it is put) until `unhold`."""
        with self._lock:
            if key not in self._held and len(self._held) + 1 >= self.max_entries:
                raise OverflowError(f"holding {key!r} would leave no unheld entry of {self.max_entries}")
            self._held.add(key)

    def unhold(self, key: str) -> None:
        """`key` is evictable again (it stays until LRU order or `pop` takes it)."""
        with self._lock:
            self._held.discard(key)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def pop(self, key: str) -> Any | None:
        with self._lock:
            return self._entries.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    def sizes(self) -> dict[str, int]:
        """Bytes of each entry, without marking any as used."""
        with self._lock:
            return {key: weights.nbytes for key, weights in self._entries.items()}

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(weights.nbytes for weights in self._entries.values())
