"""The slot table as a state machine, one transition at a time."""

import pytest

from router.slot_manager import AllSlotsBusyError, NotResidentError, Placement, SlotManager


def _residents(manager: SlotManager) -> dict[int, str]:
    return {slot: entry.key for slot, entry in manager.entries()}


def test_load_fills_free_slots_in_order():
    manager = SlotManager(2)
    assert manager.place("a@1", 10) == Placement(0, None)
    assert manager.place("b@1", 20) == Placement(1, None)
    assert _residents(manager) == {0: "a@1", 1: "b@1"}
    assert manager.free_slots == 0
    assert manager.resident_bytes == 30


def test_use_touches_and_release_returns_to_idle():
    manager = SlotManager(2)
    manager.place("a@1", 1)
    assert manager.acquire("a@1") == 0
    assert manager.acquire("a@1") == 0
    assert manager.entry(0).refcount == 2
    manager.release("a@1")
    manager.release("a@1")
    assert manager.entry(0).refcount == 0
    with pytest.raises(ValueError, match="released more often"):
        manager.release("a@1")


def test_evicts_least_recently_used_idle_slot():
    manager = SlotManager(2)
    manager.place("a@1", 1)
    manager.place("b@1", 1)
    manager.acquire("a@1")  # a is now more recent than b
    manager.release("a@1")
    assert manager.place("c@1", 1) == Placement(1, "b@1")
    assert manager.slot_of("b@1") is None
    assert _residents(manager) == {0: "a@1", 1: "c@1"}


def test_slot_in_use_is_never_evicted():
    manager = SlotManager(2)
    manager.place("a@1", 1)
    manager.place("b@1", 1)
    manager.acquire("b@1")  # b busy; a idle though older use
    manager.acquire("a@1")
    manager.release("a@1")
    assert manager.place("c@1", 1) == Placement(0, "a@1")


def test_pinned_slot_is_not_evicted_until_unpinned():
    manager = SlotManager(2)
    manager.place("a@1", 1)
    manager.place("b@1", 1)
    manager.pin("a@1")
    assert manager.place("c@1", 1) == Placement(1, "b@1")
    manager.acquire("c@1")
    assert not manager.can_place()
    with pytest.raises(AllSlotsBusyError, match="in use or pinned"):
        manager.place("d@1", 1)
    manager.unpin("a@1")
    assert manager.place("d@1", 1) == Placement(0, "a@1")


def test_refuses_when_every_slot_is_busy_then_admits_after_release():
    manager = SlotManager(1)
    manager.place("a@1", 1)
    manager.acquire("a@1")
    with pytest.raises(AllSlotsBusyError):
        manager.place("b@1", 1)
    manager.release("a@1")
    assert manager.place("b@1", 1) == Placement(0, "a@1")


def test_unload_frees_idle_slot_at_once():
    manager = SlotManager(2)
    manager.place("a@1", 5)
    assert manager.retire("a@1") is True
    assert manager.slot_of("a@1") is None
    assert manager.free_slots == 2
    assert manager.resident_bytes == 0
    assert manager.retire("a@1") is False  # not resident: nothing to do


def test_unload_of_busy_slot_waits_for_last_user():
    manager = SlotManager(1)
    manager.place("a@1", 5)
    manager.acquire("a@1")
    manager.acquire("a@1")
    assert manager.retire("a@1") is False
    with pytest.raises(NotResidentError, match="retired"):
        manager.acquire("a@1")  # no new users
    with pytest.raises(AllSlotsBusyError):
        manager.place("b@1", 1)
    manager.release("a@1")
    assert manager.slot_of("a@1") == 0
    manager.release("a@1")
    assert manager.slot_of("a@1") is None
    assert manager.free_slots == 1


def test_acquire_of_absent_adapter_names_it():
    manager = SlotManager(1)
    with pytest.raises(NotResidentError, match="x@3"):
        manager.acquire("x@3")
    manager.place("x@3", 1)
    with pytest.raises(ValueError, match="already has slot"):
        manager.place("x@3", 1)


def test_rejects_zero_slots():
    with pytest.raises(ValueError, match="at least 1"):
        SlotManager(0)
