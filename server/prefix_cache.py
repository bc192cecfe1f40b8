"""The prefix cache's bookkeeping (DESIGN decision 9): which KV blocks are kept, who uses them,
and which go first when the byte budget is full. No tensors here: a block's payload is opaque.

A prompt is cut into full blocks of `block_size` tokens. Block i's key hashes block i-1's key
with block i's tokens, and the chain starts from the adapter's `name@version` (or the base), so
one key names one prefix under one set of weights: a hot-swapped version starts a new chain and
never reads the old version's blocks. Running rows hold references to the blocks of their prompt
so their chain stays intact while they extend it; a referenced block is never evicted. Eviction
is least recently used among unreferenced blocks, and a chain is touched from its end back to
its root, so within a chain the deepest blocks go first and a kept block's parents stay.

A block's bytes count against the budget only when it has a payload of its own: a block kept
where it was computed, in the memory of a KV-cache row (`nbytes` 0), costs the budget nothing and
is never evicted for room; its owner moves it out (`rehome`, `spill`) before the row is reused.

A released adapter version's blocks can never be hit again, so they are not left to LRU: the
owner `forget`s the version's namespace once no request can use it, which drops the namespace's
unreferenced blocks at once and each referenced one at its last release.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BASE_NAMESPACE = ""  # the chain root of rows on the base model (no adapter)


def chain_keys(namespace: str, tokens: Sequence[int], block_size: int, blocks: int | None = None) -> list[bytes]:
    """Keys of the first `blocks` full blocks of `tokens` (all full blocks when None)."""
    full = len(tokens) // block_size
    count = full if blocks is None else min(blocks, full)
    parent = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    keys = []
    for index in range(count):
        block = array("q", tokens[index * block_size : (index + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass
class _Block:
    payload: Any
    nbytes: int
    namespace: str  # the chain's root: an adapter's name@version, or the base
    refs: int = 0
    forgotten: bool = False  # its namespace was released while a row held it: dropped at its last release


class PrefixIndex:
    """Blocks by key, in least-recently-used order, under a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # oldest use first
        self._by_namespace: dict[str, set[bytes]] = {}  # so a released version's blocks are found without a scan
        self.nbytes = 0  # of the blocks with a payload of their own (<= budget_bytes)
        self.unbudgeted_blocks = 0  # blocks kept in memory outside the budget (nbytes 0)
        self.evictions = 0  # blocks dropped for room
        self.forgotten_blocks = 0  # blocks dropped because their namespace was released

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def refs(self, key: bytes) -> int:
        return self._blocks[key].refs

    def blocks_of(self, namespace: str) -> int:
        """Blocks kept for chains rooted at `namespace` (in use or not)."""
        return len(self._by_namespace.get(namespace, ()))

    def bytes_of(self, namespace: str) -> int:
        """Budget bytes of the blocks kept for chains rooted at `namespace`."""
        return sum(self._blocks[key].nbytes for key in self._by_namespace.get(namespace, ()))

    def match(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of a chain are cached (a chain is only usable from its root)."""
        for count, key in enumerate(keys):
            if key not in self._blocks:
                return count
        return len(keys)

    def payloads(self, keys: Sequence[bytes]) -> list[Any]:
        return [self._blocks[key].payload for key in keys]

    def rehome(self, key: bytes, payload: Any) -> None:
        """The same bytes, kept somewhere else outside the budget (a block moved between rows)."""
        block = self._blocks[key]
        if block.nbytes:
            raise ValueError("only a block kept outside the budget moves between homes")
        block.payload = payload

    def spill(self, key: bytes, nbytes: int, make_payload: Any) -> bool:
        """Give an unreferenced block kept outside the budget a payload of its own, evicting only
        blocks used less recently than it; when that cannot make room, the block is evicted."""
        block = self._blocks[key]
        if block.refs or block.nbytes:
            raise ValueError("only an unreferenced block kept outside the budget can spill into it")
        room, victims = self.budget_bytes - self.nbytes, []
        for other_key, other in self._blocks.items():
            if room >= nbytes or other_key == key:
                break
            if other.refs == 0 and other.nbytes:
                victims.append(other_key)
                room += other.nbytes
        if room < nbytes:
            self._drop(key)
            self.evictions += 1
            return False
        for victim in victims:
            self._drop(victim)
        self.evictions += len(victims)
        block.payload, block.nbytes = make_payload(), nbytes
        self.nbytes += nbytes
        self.unbudgeted_blocks -= 1
        return True

    def acquire(self, keys: Sequence[bytes]) -> None:
        """Hold cached blocks for a running row (they cannot be evicted until released)."""
        for key in keys:
            self._blocks[key].refs += 1
        self.touch(keys)

    def release(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            block = self._blocks[key]
            if block.refs <= 0:
                raise ValueError("prefix block released more often than acquired")
            block.refs -= 1
            if block.forgotten and block.refs == 0:
                self._drop(key)
                self.forgotten_blocks += 1

    def forget(self, namespace: str) -> int:
        """Drop the blocks of a namespace no new row will look up (a released adapter version):
        the unreferenced ones now, a referenced one at its last release. Returns the bytes freed now."""
        freed = 0
        for key in list(self._by_namespace.get(namespace, ())):
            block = self._blocks[key]
            if block.refs:
                block.forgotten = True
                continue
            freed += block.nbytes
            self._drop(key)
            self.forgotten_blocks += 1
        return freed

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark a chain as just used, its root most recently (so its leaves are evicted first)."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def insert(self, key: bytes, namespace: str, nbytes: int, make_payload: Any) -> bool:
        """Add a block of `namespace`'s chain, evicting unreferenced blocks as the budget needs.
        `make_payload()` is called only once room is made. False (nothing changes but evictions)
        when the block cannot fit because every other block is in use."""
        if key in self._blocks:
            raise ValueError("prefix block is already cached; acquire it instead")
        if nbytes > self.budget_bytes:
            return False
        while self.nbytes + nbytes > self.budget_bytes:
            # Blocks kept outside the budget would free none of it.
            victim = next((k for k, block in self._blocks.items() if block.refs == 0 and block.nbytes), None)
            if victim is None:
                return False
            self._drop(victim)
            self.evictions += 1
        self._blocks[key] = _Block(make_payload(), nbytes, namespace)
        self._by_namespace.setdefault(namespace, set()).add(key)
        self.nbytes += nbytes
        self.unbudgeted_blocks += int(nbytes == 0)
        return True

    def _drop(self, key: bytes) -> None:
        block = self._blocks.pop(key)
        self.nbytes -= block.nbytes
        self.unbudgeted_blocks -= int(block.nbytes == 0)
        keys = self._by_namespace[block.namespace]
        keys.discard(key)
        if not keys:
            del self._by_namespace[block.namespace]
