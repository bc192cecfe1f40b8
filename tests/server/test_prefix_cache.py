"""The prefix cache's bookkeeping as a state machine: keys, references, LRU eviction, budget."""

import random

import pytest

from server.prefix_cache import PrefixIndex, chain_keys

BLOCK = 4


def _insert(index: PrefixIndex, key: bytes, nbytes: int = 10, namespace: str = "a@1") -> bool:
    return index.insert(key, namespace, nbytes, lambda: key)


def _insert_chain(index: PrefixIndex, namespace: str, tokens: list[int], nbytes: int = 10) -> list[bytes]:
    keys = chain_keys(namespace, tokens, BLOCK)
    for key in keys:
        assert _insert(index, key, nbytes, namespace)
    return keys


def test_keys_chain_whole_blocks_and_depend_on_every_earlier_token():
    tokens = list(range(11))
    keys = chain_keys("a@1", tokens, BLOCK)
    assert len(keys) == 2  # the partial third block has no key
    assert chain_keys("a@1", tokens, BLOCK, blocks=1) == keys[:1]
    changed = chain_keys("a@1", [99] + tokens[1:], BLOCK)
    assert changed[0] != keys[0] and changed[1] != keys[1]  # block 1's key sees block 0's tokens
    assert chain_keys("a@1", tokens[:4] + [99] + tokens[5:], BLOCK)[0] == keys[0]


def test_keys_differ_between_adapter_versions_and_the_base():
    tokens = list(range(8))
    versions = [chain_keys(namespace, tokens, BLOCK) for namespace in ("a@1", "a@2", "b@1", "")]
    assert len({key for keys in versions for key in keys}) == 8


def test_match_counts_the_cached_chain_from_its_root():
    index = PrefixIndex(100)
    keys = chain_keys("a@1", list(range(12)), BLOCK)
    _insert(index, keys[0])
    _insert(index, keys[2])  # an orphan: unusable without keys[1]
    assert index.match(keys) == 1
    _insert(index, keys[1])
    assert index.match(keys) == 3


def test_evicts_least_recently_used_unreferenced_block():
    index = PrefixIndex(30)
    for key in (b"a", b"b", b"c"):
        _insert(index, key)
    index.touch([b"a"])  # b is now the oldest
    assert _insert(index, b"d")
    assert b"b" not in index and all(key in index for key in (b"a", b"c", b"d"))
    assert index.evictions == 1


def test_block_in_use_is_never_evicted():
    index = PrefixIndex(20)
    _insert(index, b"a")
    _insert(index, b"b")
    index.acquire([b"a"])
    index.touch([b"a"])
    index.touch([b"b"])  # a is older, but held
    assert _insert(index, b"c")
    assert b"a" in index and b"b" not in index
    index.acquire([b"c"])
    assert not _insert(index, b"d")  # everything held: the new block is refused, nothing evicted
    assert b"a" in index and b"c" in index and index.nbytes == 20
    index.release([b"a"])
    assert _insert(index, b"d") and b"a" not in index


def test_release_more_often_than_acquired_is_an_error():
    index = PrefixIndex(10)
    _insert(index, b"a")
    index.acquire([b"a"])
    index.release([b"a"])
    with pytest.raises(ValueError, match="released more often"):
        index.release([b"a"])


def test_a_chain_is_evicted_from_its_deepest_block():
    index = PrefixIndex(30)
    keys = chain_keys("a@1", list(range(12)), BLOCK)
    for key in keys:
        _insert(index, key)
    index.touch(keys)
    assert _insert(index, b"other")
    assert index.match(keys) == 2  # the leaf went, the root and its child stayed usable


def test_block_larger_than_the_budget_is_refused():
    index = PrefixIndex(5)
    assert not _insert(index, b"a", nbytes=6)
    assert len(index) == 0 and index.nbytes == 0


def test_blocks_kept_outside_the_budget_cost_nothing_and_are_never_evicted_for_room():
    index = PrefixIndex(20)
    assert _insert(index, b"row", nbytes=0)  # kept in a cache row's memory
    assert _insert(index, b"a") and _insert(index, b"b") and _insert(index, b"c")
    assert b"row" in index and b"a" not in index  # the oldest block with bytes of its own went
    assert index.nbytes == 20 and index.unbudgeted_blocks == 1 and index.evictions == 1


def test_spill_evicts_only_blocks_used_less_recently():
    index = PrefixIndex(20)
    _insert(index, b"old")
    _insert(index, b"row", nbytes=0)
    _insert(index, b"new")
    assert index.spill(b"row", 10, lambda: "copied")  # "old" is older: it makes the room
    assert b"old" not in index and index.payloads([b"row"]) == ["copied"] and index.nbytes == 20
    assert index.unbudgeted_blocks == 0 and index.evictions == 1
    _insert(index, b"row2", nbytes=0)
    index.touch([b"row", b"new"])  # both used more recently than row2: it cannot push them out
    assert not index.spill(b"row2", 10, lambda: "copied")
    assert b"row2" not in index and index.nbytes == 20 and index.evictions == 2


def test_only_unreferenced_blocks_outside_the_budget_spill_and_only_those_move():
    index = PrefixIndex(100)
    _insert(index, b"row", nbytes=0)
    _insert(index, b"own")
    index.acquire([b"row"])
    with pytest.raises(ValueError, match="unreferenced"):
        index.spill(b"row", 10, lambda: "copied")
    index.rehome(b"row", "elsewhere")
    assert index.payloads([b"row"]) == ["elsewhere"]
    with pytest.raises(ValueError, match="moves between homes"):
        index.rehome(b"own", "elsewhere")


def test_forgetting_a_namespace_drops_its_blocks_and_no_other():
    index = PrefixIndex(1000)
    old = _insert_chain(index, "a@1", list(range(12))) + _insert_chain(index, "a@1", list(range(50, 58)))
    new = _insert_chain(index, "a@2", list(range(12)))
    other = _insert_chain(index, "b@1", list(range(12))) + _insert_chain(index, "", list(range(12)), nbytes=7)
    before = index.nbytes
    assert index.forget("a@1") == 5 * 10
    assert index.nbytes == before - 5 * 10 and index.forgotten_blocks == 5
    assert index.blocks_of("a@1") == 0 and not any(key in index for key in old)
    assert all(key in index for key in new + other) and index.blocks_of("a@2") == 3
    assert index.evictions == 0  # dropping is not eviction
    assert index.forget("a@1") == 0 and index.forget("never@1") == 0  # nothing left, nothing known


def test_a_forgotten_block_in_use_goes_at_its_last_release():
    index = PrefixIndex(1000)
    held = _insert_chain(index, "a@1", list(range(12)))
    loose = _insert_chain(index, "a@1", list(range(50, 58)))
    index.acquire(held[:2])
    index.acquire(held[:1])  # two rows share the root
    assert index.forget("a@1") == 3 * 10  # the loose chain and the unheld leaf go now
    assert not any(key in index for key in loose) and held[2] not in index
    assert held[0] in index and held[1] in index and index.nbytes == 20
    index.release(held[:2])
    assert held[1] not in index and held[0] in index  # the root is still held by the other row
    index.release(held[:1])
    assert len(index) == 0 and index.nbytes == 0 and index.forgotten_blocks == 5


def test_random_workload_keeps_budget_and_held_blocks():
    rng = random.Random(0)
    index = PrefixIndex(budget_bytes=200)
    held: list[list[bytes]] = []  # each running row's chain
    namespaces = ["a@1", "a@2", "b@1", ""]
    for _ in range(3000):
        draw = rng.random()
        if held and draw < 0.4:
            index.release(held.pop(rng.randrange(len(held)))[1])
        elif draw < 0.43:  # a version released: only what running rows hold may stay
            namespace = rng.choice(namespaces)
            index.forget(namespace)
            held_keys = {key for chain_namespace, chain in held if chain_namespace == namespace for key in chain}
            assert index.blocks_of(namespace) == len(held_keys)
        else:
            namespace = rng.choice(namespaces)
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 6) * BLOCK)]
            keys = chain_keys(namespace, tokens, BLOCK)
            hit = keys[: index.match(keys)]
            index.acquire(hit)
            for key in keys[len(hit) :]:
                if not _insert(index, key, nbytes=rng.choice([10, 20]), namespace=namespace):
                    break
                index.acquire([key])
                hit.append(key)
            index.touch(hit)
            held.append((namespace, hit))
        assert index.nbytes <= index.budget_bytes
        assert sum(index.blocks_of(namespace) for namespace in namespaces) == len(index)
        in_use: dict[bytes, int] = {}
        for _, chain in held:
            for key in chain:
                in_use[key] = in_use.get(key, 0) + 1
        for key, count in in_use.items():
            assert key in index and index.refs(key) == count
    assert index.evictions > 0 and index.forgotten_blocks > 0  # the workload did exercise both
