"""Batched generation with the KV cache: one prefill call, then one token per row per step.

The pieces are separate so a continuously batching engine can reuse them: `prefill` writes a batch
of prompts into chosen cache rows and returns each prompt's next-token logits; `decode_step` feeds
one token per row at that row's own position; `sample_next_tokens` (backbone.sampling) picks the
tokens. `generate` runs a fixed batch to completion with them.

Prompts of different lengths are right-padded: a query at position p only sees cache entries at
positions <= p, so a pad token's key (written past the row's real length) is never seen by the
row's real tokens and is overwritten by the row's next token (see backbone/kv_cache.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from backbone.kv_cache import KVCache
from backbone.model import CausalLM, Routing
from backbone.sampling import SamplingParams, sample_next_tokens

# The fields of a routing object that hold one entry per batch row (adapters.routing.AdapterRouting);
# they follow the rows when finished rows leave the batch. The backbone does not import adapters.
PER_ROW_ROUTING_FIELDS = ("slot_ids", "task_ids")

PAD_TOKEN_ID = 0  # any valid id: pads are never attended to by real tokens


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens; a stop token that ended the completion is not included
    text: str | None  # decoded tokens (cut before a stop string) when a tokenizer was given
    finish_reason: Literal["stop", "length"]  # "stop": stop token or stop string; "length": max_tokens


def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (B, T_max) and the prompt lengths (B,)."""
    lengths = [len(prompt) for prompt in prompts]
    input_ids = torch.full((len(prompts), max(lengths)), PAD_TOKEN_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    return input_ids.to(device), torch.tensor(lengths, device=device)


def prefill(
    model: CausalLM,
    cache: KVCache,
    prompts: Sequence[Sequence[int]],
    *,
    cache_rows: torch.Tensor | None = None,  # (B,) the cache row of each prompt; None = rows 0..B-1
    routing: Routing = None,
) -> torch.Tensor:
    """Write the prompts' keys/values into the cache in one forward call; return the logits (B, V)
    that predict each prompt's first new token."""
    device = model.inv_freq.device
    input_ids, lengths = pad_prompts(prompts, device)
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)  # (B, T)
    logits = model(
        input_ids,
        positions=positions,
        cache=cache,
        cache_rows=cache_rows,
        routing=routing,
        logits_for="last",
        last_index=lengths - 1,
    )  # (B, 1, V)
    return logits[:, 0]


def decode_step(
    model: CausalLM,
    cache: KVCache,
    tokens: torch.Tensor,  # (B,) each row's newest token
    positions: torch.Tensor,  # (B,) the position of that token (= tokens already in the row)
    *,
    cache_rows: torch.Tensor | None = None,
    routing: Routing = None,
) -> torch.Tensor:
    """Feed one token per row at the row's own position; return the next-token logits (B, V)."""
    logits = model(tokens[:, None], positions=positions[:, None], cache=cache, cache_rows=cache_rows, routing=routing)
    return logits[:, -1]


def generate(
    model: CausalLM,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    stop_token_ids: Iterable[int] | None = None,
    tokenizer: Any = None,
    routing: Routing = None,
) -> list[Completion]:
    """Complete every prompt; rows finish independently on a stop token, a stop string or
    `params.max_tokens`, and leave the batch when they do.

    stop_token_ids: None = the tokenizer's end-of-sequence ids, else the model config's; pass ()
      to never stop on a token (benchmarks generating a fixed length).
    tokenizer: anything with `decode(list[int]) -> str`; needed for stop strings and `text`.
    routing: the adapter routing of the batch rows (adapters.routing.AdapterRouting), passed to
      every model call; its per-row fields are sliced along with the rows that remain.
    """
    _check_request(model, prompts, params, tokenizer)
    stop_ids = _stop_token_set(model, stop_token_ids, tokenizer)
    batch = len(prompts)
    device = model.inv_freq.device
    lengths = [len(prompt) for prompt in prompts]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    completions: list[Completion | None] = [None] * batch
    generators = [params.make_generator(device) for _ in range(batch)]
    row_params = [params] * batch
    live = list(range(batch))  # prompt index of each row of the running batch
    with torch.inference_mode():
        cache = KVCache.for_model(
            model.config, batch, max(lengths) + params.max_tokens, dtype=model.lm_head.weight.dtype, device=device
        )
        logits = prefill(model, cache, prompts, routing=routing)
        positions = torch.tensor(lengths, device=device)  # (B,) where each row's next token goes
        for _ in range(params.max_tokens):
            tokens = sample_next_tokens(logits, row_params[: len(live)], generators)
            keep: list[int] = []
            for row, token in enumerate(tokens.tolist()):  # the step's one device sync
                index = live[row]
                finished = _append_token(outputs[index], token, params, stop_ids, tokenizer)
                if finished is not None:
                    completions[index] = finished
                else:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(live):
                # Finished rows leave: later steps compute only the rows still generating.
                keep_index = torch.tensor(keep, device=device)
                compact_cache_rows(cache, keep_index, span=int(positions.max()))
                tokens, positions = tokens[keep_index], positions[keep_index]
                routing = select_routing_rows(routing, keep_index)
                generators = [generators[row] for row in keep]
                live = [live[row] for row in keep]
            logits = decode_step(model, cache, tokens, positions, routing=routing)
            positions = positions + 1
    return [_finish(completion, tokenizer) for completion in completions]


def _append_token(
    output: list[int], token: int, params: SamplingParams, stop_ids: set[int], tokenizer: Any
) -> Completion | None:
    """Add one token to a row's output; return its Completion when the row is done."""
    if token in stop_ids:
        return Completion(list(output), None, "stop")
    output.append(token)
    if params.stop:
        text = tokenizer.decode(output)
        cut = min((at for at in (text.find(s) for s in params.stop) if at >= 0), default=-1)
        if cut >= 0:
            return Completion(list(output), text[:cut], "stop")
    if len(output) >= params.max_tokens:
        return Completion(list(output), None, "length")
    return None


def _finish(completion: Completion | None, tokenizer: Any) -> Completion:
    assert completion is not None  # every row finishes by max_tokens at the latest
    if tokenizer is not None and completion.text is None:
        completion.text = tokenizer.decode(completion.token_ids)
    return completion


def compact_cache_rows(cache: KVCache, keep: torch.Tensor, span: int) -> None:
    """Move cache rows `keep` (K,) to rows 0..K-1 (their first `span` positions), so the remaining
    batch keeps addressing rows 0..K-1: the cache then hands out slices, never per-step gathers."""
    count = keep.shape[0]
    for layer in range(len(cache.keys)):
        cache.keys[layer][:count, :, :span] = cache.keys[layer][keep, :, :span]
        cache.values[layer][:count, :, :span] = cache.values[layer][keep, :, :span]


def select_routing_rows(routing: Routing, keep: torch.Tensor) -> Routing:
    """The routing of the rows `keep`: its per-row fields sliced, everything else as it was.

    Rebuilding through dataclasses.replace reruns the routing's own __post_init__, so values it
    derives from the rows (AdapterRouting's active slots) are recomputed for the kept rows."""
    if routing is None:
        return None
    if not dataclasses.is_dataclass(routing):
        raise TypeError(f"routing must be a dataclass with per-row fields {PER_ROW_ROUTING_FIELDS}, got {type(routing)}")
    changes = {
        name: getattr(routing, name)[keep]
        for name in PER_ROW_ROUTING_FIELDS
        if isinstance(getattr(routing, name, None), torch.Tensor)
    }
    return dataclasses.replace(routing, **changes)


def _stop_token_set(model: CausalLM, stop_token_ids: Iterable[int] | None, tokenizer: Any) -> set[int]:
    if stop_token_ids is not None:
        return {int(token) for token in stop_token_ids}
    if tokenizer is not None and getattr(tokenizer, "eos_token_ids", None) is not None:
        return {int(token) for token in tokenizer.eos_token_ids}
    return set(model.config.eos_token_ids)


def _check_request(model: CausalLM, prompts: list[list[int]], params: SamplingParams, tokenizer: Any) -> None:
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (a list of token ids)")
    vocab = model.config.vocab_size
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token (e.g. BOS)")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"prompt {row} holds token id {bad}, outside the vocabulary [0, {vocab})")
    longest = max(len(prompt) for prompt in prompts) + params.max_tokens
    limit = model.config.max_position_embeddings
    if longest > limit:
        raise ValueError(
            f"the longest prompt plus max_tokens is {longest} tokens, past the model's "
            f"max_position_embeddings {limit}; shorten the prompt or lower max_tokens"
        )
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to read the text; pass tokenizer=")
