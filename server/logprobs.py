"""Log-probabilities of chosen tokens and their most likely alternatives, from a step's logits.

What they measure: the model's own next-token distribution, i.e. the fp32 log_softmax of the very
logits the sampler receives, before temperature, top-k or top-p reshape it. That is what vLLM
returns by default (its "raw_logprobs") and what a log-likelihood evaluation needs: the score of a
continuation must not depend on the sampling settings of the request that asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, most likely first


def token_logprobs(
    logits: torch.Tensor,  # (N, V) one row per token position, any dtype
    token_ids: list[int],  # (N,) the token whose logprob each row gives
    top_counts: list[int],  # (N,) how many alternatives each row reports
) -> list[TokenLogprob]:
    """One entry per row; a single host transfer for the whole batch."""
    if logits.shape[0] != len(token_ids) or len(token_ids) != len(top_counts):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(token_ids)} tokens and {len(top_counts)} top counts must match")
    if not token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V) fp32 whatever the model dtype
    ids = torch.tensor(token_ids, device=logits.device)[:, None]
    chosen = logprobs.gather(1, ids)[:, 0].tolist()
    most = max(top_counts)
    if most:
        values, indices = logprobs.topk(min(most, logprobs.shape[1]), dim=-1)  # (N, k) sorted descending
        top_values, top_ids = values.tolist(), indices.tolist()
    entries = []
    for row, (token, logprob, count) in enumerate(zip(token_ids, chosen, top_counts)):
        top = list(zip(top_ids[row][:count], top_values[row][:count])) if count else []
        entries.append(TokenLogprob(token, logprob, top))
    return entries


def prompt_logprobs_of_chunk(
    logits: torch.Tensor,  # (count, V) logits at prompt positions start .. start + count - 1
    prompt: list[int],
    start: int,
    top_count: int,
) -> list[TokenLogprob]:
    """The logprobs of the prompt tokens these positions predict (positions start+1 .. ), as far as
    the prompt goes: the last prompt position predicts the first generated token instead."""
    predicted = prompt[start + 1 : start + 1 + logits.shape[0]]
    return token_logprobs(logits[: len(predicted)], predicted, [top_count] * len(predicted))
