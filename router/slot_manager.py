"""Which adapter version lives in which resident slot of the stacked LoRA buffers.

Pure state, no tensors: the engine asks where to put an adapter, writes the weights itself, and
reports every request that starts or stops using a slot. The rules (DESIGN decision 6):
- a slot that an unfinished request uses (refcount > 0) is never handed to another adapter;
- a new adapter takes a free slot, else the least recently used idle, unpinned one;
- when every slot is in use or pinned the caller is refused (it waits and asks again later);
- a retired adapter (unloaded, or replaced by a newer version) keeps its slot until its last
  request finishes, then the slot is free.
"""

from __future__ import annotations

from dataclasses import dataclass


class SlotError(RuntimeError):
    """Base of the slot manager's refusals."""


class AllSlotsBusyError(SlotError):
    """Every slot holds an adapter that is in use or pinned; nothing can be evicted now."""


class NotResidentError(SlotError, KeyError):
    """The adapter version has no slot."""


@dataclass
class SlotEntry:
    key: str  # "name@version"
    nbytes: int  # bytes of the adapter's weights (the slot buffers are preallocated either way)
    refcount: int = 0  # unfinished requests using the slot
    pinned: bool = False
    retired: bool = False  # no new users; freed once refcount reaches 0
    last_used: int = 0  # logical clock of the last acquire, for LRU


@dataclass(frozen=True)
class Placement:
    slot: int
    evicted: str | None  # the adapter version that was in the slot, if any


class SlotManager:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        self._slots: list[SlotEntry | None] = [None] * num_slots
        self._by_key: dict[str, int] = {}
        self._clock = 0

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def slot_of(self, key: str) -> int | None:
        return self._by_key.get(key)

    def entry(self, slot: int) -> SlotEntry | None:
        return self._slots[slot]

    def entries(self) -> list[tuple[int, SlotEntry]]:
        return [(slot, entry) for slot, entry in enumerate(self._slots) if entry is not None]

    @property
    def free_slots(self) -> int:
        return sum(entry is None for entry in self._slots)

    @property
    def resident_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._slots if entry is not None)

    def can_place(self) -> bool:
        return self._choose_slot() is not None

    def place(self, key: str, nbytes: int) -> Placement:
        """Give `key` a slot (free, else the LRU idle unpinned one). The caller writes the
        weights into `placement.slot` before any request uses it."""
        if key in self._by_key:
            raise ValueError(f"adapter {key} already has slot {self._by_key[key]}; acquire it instead")
        slot = self._choose_slot()
        if slot is None:
            raise AllSlotsBusyError(
                f"all {self.num_slots} adapter slots are in use or pinned; wait for a request to finish, "
                "unpin an adapter or raise --max-loras"
            )
        evicted = self._slots[slot]
        if evicted is not None:
            del self._by_key[evicted.key]
        self._slots[slot] = SlotEntry(key, nbytes, last_used=self._tick())
        self._by_key[key] = slot
        return Placement(slot, evicted.key if evicted is not None else None)

    def acquire(self, key: str) -> int:
        """One more request uses `key`'s slot; returns the slot."""
        entry = self._entry_of(key)
        if entry.retired:
            raise NotResidentError(f"adapter {key} is retired and takes no new requests")
        entry.refcount += 1
        entry.last_used = self._tick()
        return self._by_key[key]

    def release(self, key: str) -> None:
        """A request on `key` finished; a retired adapter's slot is freed with its last user."""
        entry = self._entry_of(key)
        if entry.refcount == 0:
            raise ValueError(f"adapter {key} is released more often than acquired")
        entry.refcount -= 1
        if entry.retired and entry.refcount == 0:
            self._free(key)

    def pin(self, key: str) -> None:
        self._entry_of(key).pinned = True

    def unpin(self, key: str) -> None:
        self._entry_of(key).pinned = False

    def retire(self, key: str) -> bool:
        """Take `key` out of service: its slot is freed now if idle (returns True), else when
        the last request using it finishes. No-op (False) if it has no slot."""
        if key not in self._by_key:
            return False
        entry = self._entry_of(key)
        entry.retired, entry.pinned = True, False
        if entry.refcount == 0:
            self._free(key)
            return True
        return False

    def _choose_slot(self) -> int | None:
        for slot, entry in enumerate(self._slots):
            if entry is None:
                return slot
        idle = [(entry.last_used, slot) for slot, entry in enumerate(self._slots) if entry and entry.refcount == 0 and not entry.pinned]
        return min(idle)[1] if idle else None

    def _entry_of(self, key: str) -> SlotEntry:
        slot = self._by_key.get(key)
        if slot is None:
            raise NotResidentError(f"adapter {key} has no resident slot")
        return self._slots[slot]  # type: ignore[return-value]

    def _free(self, key: str) -> None:
        self._slots[self._by_key.pop(key)] = None

    def _tick(self) -> int:
        self._clock += 1
        return self._clock
