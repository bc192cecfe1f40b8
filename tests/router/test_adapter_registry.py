"""Adapter versions by name, and the CPU tier's LRU."""

import threading

from router.adapter_registry import AdapterInfo, AdapterRegistry
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
