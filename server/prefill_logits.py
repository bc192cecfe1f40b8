"""A prefill forward that also returns the logits at every position of the rows that score their
prompt (echo with logprobs), while the other rows pay only for their last position's logits.

Only the scored rows' positions go through the vocabulary projection, so a chunk costs at most
prefill_chunk x vocabulary logits however many rows it holds."""

from __future__ import annotations

import torch

from adapters.routing import AdapterRouting
from backbone.kv_cache import KVCache
from backbone.model import CausalLM


def prefill_logits(
    model: CausalLM,
    input_ids: torch.Tensor,  # (B, width) right-padded chunks
    positions: torch.Tensor,  # (B, width)
    cache: KVCache,
    cache_rows: torch.Tensor,  # (B,)
    routing: AdapterRouting | None,
    last_index: torch.Tensor,  # (B,) each row's last real token in the chunk
    key_span: int,
    scored: dict[int, int],  # batch index -> real tokens in its chunk, for the rows that score their prompt
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(B, V) logits at each row's last token, and {batch index: (count, V) logits} for `scored`."""
    if not scored:
        logits = model(
            input_ids, positions=positions, cache=cache, cache_rows=cache_rows, routing=routing,
            logits_for="last", last_index=last_index, key_span=key_span,
        )  # fmt: skip
        return logits[:, 0], {}
    hidden = model.hidden_states(input_ids, positions, cache, cache_rows, routing, key_span=key_span)  # (B, width, H)
    batch = torch.arange(hidden.shape[0], device=hidden.device)
    last = model.lm_head(hidden[batch, last_index][:, None], routing)[:, 0]  # (B, V)
    # lm_head is never a LoRA target (CausalLM.linear_modules leaves it out), so a row's positions
    # need no routing of their own.
    every = {index: model.lm_head(hidden[index, :count]) for index, count in scored.items()}  # (count, V)
    return last, every
