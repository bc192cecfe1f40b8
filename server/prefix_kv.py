"""The prefix cache's tensors: where each kept KV block lives, and the copies into a new row's
cache before it prefills the rest of its prompt.

Why copies, not shared pages: the engine's KV cache keeps each sequence contiguous in its own
row (rows, kv_heads, positions, head_dim), which lets decode read the running batch as one slice
and attention run without a page table. A block of 16 tokens is a few hundred KB to copy (memory
speed), where recomputing it is a full forward pass over those tokens through every layer; the
copy keeps the fast decode path and costs a small fraction of the prefill it saves.

One budget with the running rows: the cache rows are allocated for every row at once (at the full
context on a GPU), so a block is kept where its row computed it, at no cost, for as long as that
row's memory is not needed: while the row runs (its prompt positions never change) and after it
ends, while the row is idle. When the pool hands the row to a new request, its blocks that begin
the new prompt stay (the request reuses them without a copy) and the others move out: to a
running row that holds the block (the same positions of its own cache hold the same keys and
values, so nothing is copied), else into the prefix cache's own budget (`--prefix-cache-mb`,
LRU), else they are evicted. Idle rows' memory thus serves as prefix cache
and rows in use take it back; the total stays the rows' cache plus the budget, as planned at start.

Only full blocks of the prompt are kept, and a hit always leaves at least the prompt's last token
to compute, since its logits give the first generated token. Called only from the engine's
worker thread; `stats()` may be read from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from server.batch_state import CachePool, Row
from server.prefix_cache import BASE_NAMESPACE, PrefixIndex, chain_keys


@dataclass(frozen=True)
class PrefixCacheStats:
    hit_tokens: int  # prompt tokens whose KV came from the cache
    miss_tokens: int  # prompt tokens prefilled by the model
    evictions: int  # blocks dropped for room (LRU)
    dropped_blocks: int  # blocks dropped because their adapter version was released
    blocks: int  # all kept blocks: in cache rows and in the budget
    row_blocks: int  # kept in the memory of cache rows (running or idle), outside the budget
    nbytes: int  # of the blocks in the budget
    budget_bytes: int


@dataclass(frozen=True)
class InRow:
    """A block kept where it was computed: block i is positions [i * block, (i + 1) * block) of
    this cache row."""

    cache_row: int


class PrefixCache:
    def __init__(self, pool: CachePool, block_size: int, budget_bytes: int) -> None:
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1 token, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.index = PrefixIndex(budget_bytes)
        keys = pool.cache.keys
        layers, (_, kv_heads, _, head_dim) = len(keys), keys[0].shape
        # A block with a payload of its own: a key and a value block per layer: (2 * layers, kv_heads, block, head_dim).
        self._block_shape = (2 * layers, kv_heads, block_size, head_dim)
        self.block_bytes = 2 * layers * kv_heads * block_size * head_dim * keys[0].element_size()
        self.hit_tokens = 0
        self.miss_tokens = 0
        # Blocks that rows are prefilling now (key -> rows), and each such row's keys: a row whose
        # next uncached block is among them waits for it instead of computing it a second time.
        self._in_flight: dict[bytes, int] = {}
        self._computing: dict[int, list[bytes]] = {}
        self._homed: dict[int, dict[bytes, int]] = {}  # cache row -> blocks kept in it (key -> block index)
        self._holders: dict[bytes, set[int]] = {}  # key -> cache rows of the running rows that hold it

    def attach(self, row: Row) -> bool:
        """Before a row's first prefill chunk: copy its longest cached prefix into its cache row
        and hold those blocks. False (nothing done) when another row is computing the row's
        next block right now: the row should wait a step and try again."""
        keys = self._usable_chain(row)
        matched = self.index.match(keys)
        if matched < len(keys) and keys[matched] in self._in_flight:
            return False
        computing = self._chain(row)[matched:]
        for key in computing:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._computing[id(row)] = computing
        keys = keys[:matched]
        self._hold(row, keys)
        row.prefix_keys = keys
        if keys:
            self.pool.ensure_positions(len(keys) * self.block_size)
            cache = self.pool.cache
            for block, payload in enumerate(self.index.payloads(keys)):
                span = slice(block * self.block_size, (block + 1) * self.block_size)
                if _kept_in(payload, row.cache_row):
                    continue  # already in place: the row's cache row kept it since an earlier request
                for layer in range(len(cache.keys)):
                    if isinstance(payload, InRow):
                        source_keys = cache.keys[layer][payload.cache_row, :, span]
                        source_values = cache.values[layer][payload.cache_row, :, span]
                    else:
                        source_keys, source_values = payload[2 * layer], payload[2 * layer + 1]
                    cache.keys[layer][row.cache_row, :, span].copy_(source_keys)
                    cache.values[layer][row.cache_row, :, span].copy_(source_values)
        row.prefilled = len(keys) * self.block_size
        self.hit_tokens += row.prefilled
        self.miss_tokens += len(row.prompt) - row.prefilled
        return True

    def store(self, row: Row) -> None:
        """Once a row's whole prompt is in its cache: keep the full blocks not cached yet, where
        they are (no copy, no budget)."""
        self._done_computing(row)
        held = row.prefix_keys if row.prefix_keys is not None else []
        namespace = _namespace(row)
        keys = self._chain(row)
        for block in range(len(held), len(keys)):
            key = keys[block]
            if key not in self.index:  # another row with the same prefix may have stored it meanwhile
                self.index.insert(key, namespace, 0, partial(InRow, row.cache_row))
                self._homed.setdefault(row.cache_row, {})[key] = block
            self._hold(row, [key])
            held.append(key)
        self.index.touch(held)
        row.prefix_keys = held

    def release(self, row: Row) -> None:
        """When a row ends: its blocks stay cached, free to be evicted; those kept in its cache
        row stay there until the row is handed out again (`reclaim`)."""
        self._done_computing(row)
        if row.prefix_keys:
            for key in row.prefix_keys:
                holders = self._holders[key]
                holders.discard(row.cache_row)
                if not holders:
                    del self._holders[key]
            self.index.release(row.prefix_keys)
        row.prefix_keys = None

    def reclaim(self, row: Row) -> None:
        """As the pool hands a cache row to a new request, before it is written: the blocks kept
        in its memory stay where they are if they begin the new prompt (it will attach them), and
        otherwise move to a running row that holds them, else into the budget, else are evicted."""
        cache_row = row.cache_row
        usable = self._usable_chain(row)
        # A row that scores its prompt computes every position itself: nothing can stay in place.
        in_place = set() if row.scores_prompt else set(usable[: self.index.match(usable)])
        homed = self._homed.pop(cache_row, {})
        for key, block in sorted(homed.items(), key=lambda item: item[1]):  # parents first
            if key not in self.index or not _kept_in(self.index.payloads([key])[0], cache_row):
                continue  # dropped (its version released) since it was stored
            if key in in_place:
                self._homed.setdefault(cache_row, {})[key] = block
                continue
            holders = self._holders.get(key)
            if holders:
                holder = min(holders)
                self.index.rehome(key, InRow(holder))
                self._homed.setdefault(holder, {})[key] = block
            else:
                self.index.spill(key, self.block_bytes, partial(self._copy_out, cache_row, block))

    def drop_version(self, key: str) -> None:
        """An adapter version ("name@version") was released: no request can hit its blocks again,
        so they go now instead of waiting for LRU (a block a row still holds, at its release)."""
        self.index.forget(key)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            hit_tokens=self.hit_tokens,
            miss_tokens=self.miss_tokens,
            evictions=self.index.evictions,
            dropped_blocks=self.index.forgotten_blocks,
            blocks=len(self.index),
            row_blocks=self.index.unbudgeted_blocks,
            nbytes=self.index.nbytes,
            budget_bytes=self.index.budget_bytes,
        )

    def _chain(self, row: Row) -> list[bytes]:
        """The keys of the row's full prompt blocks, hashed once per row (the row is looked up,
        reclaimed for and stored with the same chain)."""
        if row.prefix_chain is None:
            row.prefix_chain = chain_keys(_namespace(row), row.prompt, self.block_size)
        return row.prefix_chain

    def _usable_chain(self, row: Row) -> list[bytes]:
        """The blocks a hit may cover: the last prompt token is always computed, for its logits."""
        return self._chain(row)[: (len(row.prompt) - 1) // self.block_size]

    def _hold(self, row: Row, keys: list[bytes]) -> None:
        self.index.acquire(keys)
        for key in keys:
            self._holders.setdefault(key, set()).add(row.cache_row)

    def _done_computing(self, row: Row) -> None:
        for key in self._computing.pop(id(row), []):
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]

    def _copy_out(self, cache_row: int, block: int) -> torch.Tensor:
        cache = self.pool.cache
        payload = torch.empty(self._block_shape, dtype=cache.keys[0].dtype, device=cache.keys[0].device)
        span = slice(block * self.block_size, (block + 1) * self.block_size)
        for layer in range(len(cache.keys)):
            payload[2 * layer].copy_(cache.keys[layer][cache_row, :, span])
            payload[2 * layer + 1].copy_(cache.values[layer][cache_row, :, span])
        return payload


def _namespace(row: Row) -> str:
    return row.adapter.key if row.adapter is not None else BASE_NAMESPACE


def _kept_in(payload: object, cache_row: int) -> bool:
    return isinstance(payload, InRow) and payload.cache_row == cache_row
