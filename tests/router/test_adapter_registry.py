"""Adapter versions by name, and the CPU tier's LRU."""

import threading

import pytest

from router.adapter_registry import AdapterInfo, AdapterRegistry, UnknownVersionError, split_reference
from router.cpu_cache import CpuAdapterCache


def _info(name: str, version: int) -> AdapterInfo:
    return AdapterInfo(name, version, f"/adapters/{name}", 4, ("q_proj",), None)


def test_new_registration_gets_next_version_and_replaces_current():
    registry = AdapterRegistry()
    assert registry.reserve_version("x") == 1
    assert registry.publish(_info("x", 1)) is None
    assert registry.reserve_version("x") == 2
    previous = registry.publish(_info("x", 2))
    assert previous.key == "x@1"
    assert registry.current("x").key == "x@2"
    assert [info.key for info in registry.infos()] == ["x@2"]


def test_versions_keep_growing_after_unregister():
    registry = AdapterRegistry()
    registry.publish(_info("x", registry.reserve_version("x")))
    assert registry.remove("x").key == "x@1"
    assert registry.current("x") is None
    assert registry.remove("x") is None
    assert registry.reserve_version("x") == 2  # x@1 may still serve requests: never reuse the key


def test_slower_older_registration_does_not_win():
    registry = AdapterRegistry()
    old, new = registry.reserve_version("x"), registry.reserve_version("x")
    registry.publish(_info("x", new))
    assert registry.publish(_info("x", old)).key == "x@1"  # returned as superseded
    assert registry.current("x").key == "x@2"


def test_concurrent_reservations_are_distinct():
    registry = AdapterRegistry()
    versions: list[int] = []
    threads = [threading.Thread(target=lambda: versions.extend(registry.reserve_version("x") for _ in range(100))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(1, 401))


class _Weights:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_cpu_cache_evicts_least_recently_used_and_counts_bytes():
    cache = CpuAdapterCache(2)
    assert cache.put("a@1", _Weights(10)) == []
    assert cache.put("b@1", _Weights(20)) == []
    assert cache.get("a@1") is not None  # a becomes most recent
    assert cache.put("c@1", _Weights(30)) == ["b@1"]
    assert cache.keys() == ["a@1", "c@1"]
    assert cache.nbytes == 40
    assert cache.pop("a@1").nbytes == 10
    assert cache.nbytes == 30
    assert "a@1" not in cache and len(cache) == 1


def test_cpu_cache_never_evicts_a_held_key_and_counts_it_in_its_entries():
    cache = CpuAdapterCache(3)
    cache.hold("pinned@1")  # held before it is even there: a read-back puts it later
    cache.put("pinned@1", _Weights(10))
    cache.hold("other@1")
    cache.put("other@1", _Weights(10))
    with pytest.raises(OverflowError, match="no unheld entry of 3"):
        cache.hold("third@1")
    assert cache.put("a@1", _Weights(10)) == []
    assert cache.put("b@1", _Weights(10)) == ["a@1"]  # the held ones are older, yet stay
    assert cache.put("c@1", _Weights(10)) == ["b@1"]
    assert cache.keys() == ["pinned@1", "other@1", "c@1"] and len(cache) == cache.max_entries
    cache.unhold("pinned@1")
    assert cache.put("d@1", _Weights(10)) == ["pinned@1"]  # evictable again, least recently used
    assert cache.held() == {"other@1"}


def test_pinned_version_is_kept_after_a_hot_swap_until_its_last_pin_goes():
    registry = AdapterRegistry()
    registry.publish(_info("x", registry.reserve_version("x")))
    assert registry.pin("x@1").key == "x@1"
    assert registry.pin("x@1").key == "x@1"  # two experiments pin the same version
    registry.publish(_info("x", registry.reserve_version("x")))
    assert registry.is_kept("x@1")
    assert registry.lookup("x").key == "x@2"  # plain name: the latest, as before
    assert registry.lookup("x@1").key == "x@1" and registry.lookup("x@2").key == "x@2"
    assert [info.key for info in registry.infos()] == ["x@2"]  # the listing shows current versions only
    assert registry.unpin("x@1") is None  # one pin left
    assert registry.unpin("x@1").key == "x@1"  # the last pin: handed back to be retired
    assert registry.lookup("x@1") is None and not registry.is_kept("x@1")
    assert registry.unpin("x@1") is None  # a stray release changes nothing


def test_unpinned_old_version_is_not_kept_and_pinning_it_names_the_current_one():
    registry = AdapterRegistry()
    registry.publish(_info("x", registry.reserve_version("x")))
    registry.publish(_info("x", registry.reserve_version("x")))
    assert registry.lookup("x@1") is None and not registry.is_kept("x@1")
    with pytest.raises(UnknownVersionError, match=r"'x@1'.*current version is x@2"):
        registry.pin("x@1")
    with pytest.raises(UnknownVersionError, match="no version of that name"):
        registry.pin("y@1")
    assert registry.pinned() == {}


def test_pinned_current_version_survives_unregistering_its_name():
    registry = AdapterRegistry()
    registry.publish(_info("x", registry.reserve_version("x")))
    registry.pin("x@1")
    assert registry.remove("x").key == "x@1"
    assert registry.is_kept("x@1") and registry.lookup("x@1").key == "x@1"
    assert registry.lookup("x") is None  # the name itself is gone
    assert registry.unpin("x@1").key == "x@1"


def test_pinned_versions_are_bounded():
    registry = AdapterRegistry()
    for name in ("a", "b", "c"):
        registry.publish(_info(name, registry.reserve_version(name)))
    registry.pin("a@1", max_pinned=2)
    registry.pin("b@1", max_pinned=2)
    registry.pin("a@1", max_pinned=2)  # a second pin of a pinned version costs nothing
    with pytest.raises(OverflowError, match="more than 2 pinned adapter versions"):
        registry.pin("c@1", max_pinned=2)
    registry.unpin("b@1")
    assert registry.pin("c@1", max_pinned=2).key == "c@1"


def test_references_split_into_name_and_version():
    assert split_reference("x") == ("x", None)
    assert split_reference("x@12") == ("x", 12)
    for bad in ("x@", "x@0", "x@v1", "@1", "x@1@2"):
        with pytest.raises(ValueError, match="NAME@VERSION"):
            split_reference(bad)
    assert AdapterRegistry().lookup("x@v1") is None
