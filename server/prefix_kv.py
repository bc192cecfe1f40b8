"""The prefix cache's tensors: KV blocks copied out of a row's cache once its prompt is in, and
copied into a new row's cache before it prefills the rest of its prompt.

Why copies, not shared pages: the engine's KV cache keeps each sequence contiguous in its own
row (rows, kv_heads, positions, head_dim), which lets decode read the running batch as one slice
and attention run without a page table. A block of 16 tokens is a few hundred KB to copy (memory
speed), where recomputing it is a full forward pass over those tokens through every layer; the
copy keeps the fast decode path and costs a small fraction of the prefill it saves.

Only full blocks of the prompt are kept, and a hit always leaves at least the prompt's last token
to compute, since its logits give the first generated token.

The kept blocks have a budget of their own (`--prefix-cache-mb`) beside the running rows' cache,
which is allocated for every row at once (at the full context on a GPU). Growing the blocks'
budget while rows are idle would not share memory but add to it, as long as blocks are tensors
of their own: a shared budget needs blocks that live in idle rows' memory (a finished row's
prompt blocks left in place until the row is handed out again, then moved to a row that holds
them or copied into the kept budget, else dropped). Called only from the engine's
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
    blocks: int
    nbytes: int
    budget_bytes: int


class PrefixCache:
    def __init__(self, pool: CachePool, block_size: int, budget_bytes: int) -> None:
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1 token, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.index = PrefixIndex(budget_bytes)
        keys = pool.cache.keys
        layers, (_, kv_heads, _, head_dim) = len(keys), keys[0].shape
        # One block holds a key and a value block per layer: (2 * layers, kv_heads, block, head_dim).
        self._block_shape = (2 * layers, kv_heads, block_size, head_dim)
        self.block_bytes = 2 * layers * kv_heads * block_size * head_dim * keys[0].element_size()
        self.hit_tokens = 0
        self.miss_tokens = 0
        # Blocks that rows are prefilling now (key -> rows), and each such row's keys: a row whose
        # next uncached block is among them waits for it instead of computing it a second time.
        self._in_flight: dict[bytes, int] = {}
        self._computing: dict[int, list[bytes]] = {}

    def attach(self, row: Row) -> bool:
        """Before a row's first prefill chunk: copy its longest cached prefix into its cache row
        and hold those blocks. False (nothing done) when another row is computing the row's
        next block right now: the row should wait a step and try again."""
        namespace = _namespace(row)
        usable = (len(row.prompt) - 1) // self.block_size  # the last prompt token is always computed
        keys = chain_keys(namespace, row.prompt, self.block_size, usable)
        matched = self.index.match(keys)
        if matched < len(keys) and keys[matched] in self._in_flight:
            return False
        computing = chain_keys(namespace, row.prompt, self.block_size)[matched:]
        for key in computing:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._computing[id(row)] = computing
        keys = keys[:matched]
        self.index.acquire(keys)
        row.prefix_keys = keys
        if keys:
            self.pool.ensure_positions(len(keys) * self.block_size)
            cache = self.pool.cache
            for block, payload in enumerate(self.index.payloads(keys)):
                span = slice(block * self.block_size, (block + 1) * self.block_size)
                for layer in range(len(cache.keys)):
                    cache.keys[layer][row.cache_row, :, span].copy_(payload[2 * layer])
                    cache.values[layer][row.cache_row, :, span].copy_(payload[2 * layer + 1])
        row.prefilled = len(keys) * self.block_size
        self.hit_tokens += row.prefilled
        self.miss_tokens += len(row.prompt) - row.prefilled
        return True

    def store(self, row: Row) -> None:
        """Once a row's whole prompt is in its cache: keep the full blocks not cached yet."""
        self._done_computing(row)
        held = row.prefix_keys if row.prefix_keys is not None else []
        namespace = _namespace(row)
        keys = chain_keys(namespace, row.prompt, self.block_size)
        for block in range(len(held), len(keys)):
            key = keys[block]
            # Another row with the same prefix may have stored it meanwhile.
            copy_out = partial(self._copy_out, row, block)  # run only once there is room
            if key not in self.index and not self.index.insert(key, namespace, self.block_bytes, copy_out):
                break  # full of blocks in use; a later block would have no parent
            self.index.acquire([key])
            held.append(key)
        self.index.touch(held)
        row.prefix_keys = held

    def release(self, row: Row) -> None:
        """When a row ends: its blocks stay cached, free to be evicted."""
        self._done_computing(row)
        if row.prefix_keys:
            self.index.release(row.prefix_keys)
        row.prefix_keys = None

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
            nbytes=self.index.nbytes,
            budget_bytes=self.index.budget_bytes,
        )

    def _done_computing(self, row: Row) -> None:
        for key in self._computing.pop(id(row), []):
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]

    def _copy_out(self, row: Row, block: int) -> torch.Tensor:
        cache = self.pool.cache
        payload = torch.empty(self._block_shape, dtype=cache.keys[0].dtype, device=cache.keys[0].device)
        span = slice(block * self.block_size, (block + 1) * self.block_size)
        for layer in range(len(cache.keys)):
            payload[2 * layer].copy_(cache.keys[layer][row.cache_row, :, span])
            payload[2 * layer + 1].copy_(cache.values[layer][row.cache_row, :, span])
        return payload


def _namespace(row: Row) -> str:
    return row.adapter.key if row.adapter is not None else BASE_NAMESPACE
