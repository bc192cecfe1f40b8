import pytest

from router.feedback_index import FeedbackIndex


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_feedback_is_joined_once_and_duplicates_are_reported():
    index = FeedbackIndex(ttl_s=60, max_entries=10, clock=Clock())
    index.remember("r1", "exp", "a")
    entry, first = index.claim("r1")
    assert (entry.experiment, entry.arm, first) == ("exp", "a", True)
    assert index.claim("r1")[1] is False
    assert index.claim("never-served") is None


def test_entries_expire_after_the_ttl_and_are_counted():
    clock = Clock()
    index = FeedbackIndex(ttl_s=60, max_entries=10, clock=clock)
    index.remember("old", "exp", "a")
    clock.now = 30
    index.remember("young", "exp", "b")
    clock.now = 61
    assert index.claim("old") is None and index.claim("young") is not None
    assert index.describe()["dropped_expired"] == 1


def test_size_cap_drops_the_oldest_and_counts_them():
    index = FeedbackIndex(ttl_s=60, max_entries=3, clock=Clock())
    for i in range(5):
        index.remember(f"r{i}", "exp", "a")
    assert len(index) == 3
    assert index.claim("r0") is None and index.claim("r1") is None and index.claim("r4") is not None
    assert index.describe()["dropped_over_capacity"] == 2


def test_forgetting_an_experiment_drops_its_ids():
    index = FeedbackIndex(clock=Clock())
    index.remember("r1", "one", "a")
    index.remember("r2", "two", "a")
    index.forget_experiment("one")
    assert index.claim("r1") is None and index.claim("r2") is not None


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="ttl_s > 0"):
        FeedbackIndex(ttl_s=0)
