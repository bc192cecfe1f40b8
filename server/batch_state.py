"""The running batch's state: one `Row` per admitted request, and the pool of KV-cache rows.

A row moves prefill -> decode -> finished. While prefilling, `prefilled` counts the prompt tokens
already in its cache row; once the whole prompt is in, each decode step feeds the last generated
token at the next position.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import torch

from backbone.config import ModelConfig
from backbone.kv_cache import KVCache
from backbone.sampling import SamplingParams
from router.adapter_registry import AdapterInfo
from server.logprobs import TokenLogprob
from server.request_handle import GenerationRequest, RequestHandle
from server.text_stream import TextStream


@dataclass
class Row:
    request: GenerationRequest
    handle: RequestHandle
    adapter: AdapterInfo | None
    slot: int  # resident adapter slot; -1 = the base model
    cache_row: int
    stream: TextStream
    generator: torch.Generator | None
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)  # tokens whose text has not been sent yet
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs: one per generated token
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # those of unsent_ids (and a final stop token)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # with params.prompt_logprobs
    first_token_time: float | None = None
    ended: bool = False  # finish() has begun for this row
    prefix_keys: list[bytes] | None = None  # prefix-cache blocks this row holds; None = not looked up yet
    prefix_chain: list[bytes] | None = None  # its prompt's full-block keys (server/prefix_kv.py), hashed once
    newcomer: bool = False  # in its first step, and its tenant had no row in the step before (server.prefill_order)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def scores_prompt(self) -> bool:
        """Wants the logprobs of its prompt tokens, so every prompt position must be computed."""
        return self.request.params.prompt_logprobs is not None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def next_position(self) -> int:
        """Position of the token the next decode step feeds (the last generated one)."""
        return len(self.prompt) + len(self.generated) - 1

    def mark_first_token(self) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()


class CachePool:
    """KV-cache rows handed to requests. Positions are allocated as the longest sequence needs
    them (doubling, up to the limit), so a model with a long context does not reserve
    rows x max_context of memory up front."""

    def __init__(
        self,
        config: ModelConfig,
        rows: int,
        max_positions: int,
        initial_positions: int = 256,
        dtype: torch.dtype = torch.float32,  # the model's dtype: keys and values are stored as computed
        device: torch.device | str = "cpu",
    ) -> None:
        self._config = config
        self.max_positions = max_positions
        self.cache = KVCache.for_model(config, rows, min(initial_positions, max_positions), dtype=dtype, device=device)
        # A min-heap: the lowest free row goes first, so a full batch occupies rows 0..n-1 and
        # decode reads the cache as one slice instead of gathering rows (BatchRunner._decode).
        self._free = list(range(rows))

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache row: admit at most max_running requests")
        return heapq.heappop(self._free)

    def give_back(self, row: int) -> None:
        # Stale keys need no clearing: the next sequence overwrites each position before any
        # of its queries can see it.
        heapq.heappush(self._free, row)

    def ensure_positions(self, needed: int) -> None:
        """Make room for positions [0, needed)."""
        current = self.cache.max_len
        if needed <= current:
            return
        if needed > self.max_positions:
            raise ValueError(f"position {needed - 1} is past the cache limit of {self.max_positions} positions")
        size = min(max(needed, 2 * current), self.max_positions)
        old = self.cache
        self.cache = KVCache.for_model(self._config, old.max_rows, size, dtype=old.keys[0].dtype, device=old.keys[0].device)
        for layer in range(len(old.keys)):
            self.cache.keys[layer][:, :, :current].copy_(old.keys[layer])
            self.cache.values[layer][:, :, :current].copy_(old.values[layer])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.keys + self.cache.values)
