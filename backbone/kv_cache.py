"""A preallocated key/value cache addressed by (cache row, absolute position).

Each sequence owns one cache row; the key of the token at position p lives at index p. A forward
call writes its tokens' keys at their positions and attends to every index <= the query's
position. That one rule makes right padding harmless: a pad token's key lands past the row's
real length, is invisible to the row's real queries, and is overwritten by the next real token.
"""

from __future__ import annotations

import torch

from backbone.config import ModelConfig


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (max_rows, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_rows = max_rows
        self.max_len = max_len

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        max_rows: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "KVCache":
        return cls(config.num_hidden_layers, max_rows, max_len, config.num_key_value_heads, config.head_dim, dtype, device)

    def update(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor | None,
        span: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, kv_heads, T, hd) keys/values at `positions` (B, T) of cache `rows` (B,)
        (None = rows 0..B-1), and return each row's keys/values at indices [0, span)."""
        batch, heads, _, head_dim = keys.shape
        row_index = torch.arange(batch, device=keys.device) if rows is None else rows
        # The flat index of each (row, head, position) in the cache seen as (rows*heads*max_len, hd):
        # index_copy_ then moves whole head_dim vectors, where index_put with a slice between the
        # indices took milliseconds per layer for a one-token decode write.
        head_index = torch.arange(heads, device=keys.device)
        flat = ((row_index[:, None, None] * heads + head_index[None, :, None]) * self.max_len + positions[:, None, :]).reshape(-1)
        self.keys[layer].view(-1, head_dim).index_copy_(0, flat, keys.reshape(-1, head_dim))  # (B*heads*T, hd)
        self.values[layer].view(-1, head_dim).index_copy_(0, flat, values.reshape(-1, head_dim))
        if rows is None:
            return self.keys[layer][:batch, :, :span], self.values[layer][:batch, :, :span]
        return self.keys[layer][rows, :, :span], self.values[layer][rows, :, :span]
