"""Next-token sampling with per-row parameters: greedy, temperature, top-k, top-p, seeds.

Rows of a continuously batched decode step belong to different requests, so every row carries its
own `SamplingParams` and its own random generator. A seeded row draws only from its own generator,
one uniform number per step, so its tokens do not depend on which other rows share the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Seeds go to torch.Generator.manual_seed, which takes any 64-bit value.
_MAX_SEED = 2**64 - 1
# Below this, logits / temperature overflows fp32 (1e-300 rounds to 0 and divides by zero), and
# the distribution is the argmax anyway: such temperatures are greedy.
GREEDY_TEMPERATURE = 1e-5
# Most alternatives a request may ask for per token (vLLM's default max_logprobs, OpenAI's top_logprobs).
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most; the completion ends with finish_reason "length"
    temperature: float = 0.0  # below GREEDY_TEMPERATURE (0 included) = greedy (argmax); else logits / it
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose mass reaches top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # a seeded request is reproducible whatever else shares its batch
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first match
    # Log-probabilities of the model's own distribution (fp32 log_softmax of the raw logits, before
    # temperature, top-k and top-p), as vLLM returns them. None = not computed; N = the chosen
    # token's plus the N most likely tokens'.
    logprobs: int | None = None  # for each generated token
    prompt_logprobs: int | None = None  # for each prompt token after the first (which has none)

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        # Scoring a prompt (its logprobs) needs no new token; a generation needs at least one.
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise ValueError(f"max_tokens must be an integer >= {least}, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]  # OpenAI accepts a single string as well as a list
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The row's own random generator: seeded when `seed` is set, else None (global RNG)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sample_next_tokens(
    logits: torch.Tensor,  # (B, V)
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of each row, (B,) long. Greedy rows take the argmax; the others sample from
    softmax(logits / temperature) restricted by top-k, then top-p (the order transformers uses)."""
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"logits have {batch} rows but {len(params)} sampling params and {len(generators)} generators "
            "were given; pass one of each per row"
        )
    # (B,) greedy rows are done here; max().indices is argmax (first maximum on ties) at a third
    # of argmax's CPU time over a large vocabulary.
    tokens = logits.max(dim=-1).indices
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return tokens
    rows = torch.tensor(sampled_rows, device=logits.device)
    chosen = _sample_rows(
        logits[rows].float(),
        [params[row] for row in sampled_rows],
        [generators[row] for row in sampled_rows],
    )
    tokens[rows] = chosen
    return tokens


def _sample_rows(
    logits: torch.Tensor,  # (N, V) fp32, every row sampled (temperature > 0)
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    vocab = logits.shape[1]
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    sorted_logits, sorted_ids = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)  # (N, V)
    probs = filtered_probs(sorted_logits, [p.top_k for p in params], [p.top_p for p in params])
    # Inverse-CDF draw with one uniform per row from the row's own generator: the row's token
    # depends only on its logits and its generator, never on the other rows.
    uniforms = _row_uniforms(generators, device)  # (N, 1)
    cdf = probs.cumsum(dim=-1)  # (N, V)
    # Scaling u by the total mass absorbs rounding in the cumulative sum; right=True skips
    # zero-probability (filtered) entries, which sit at the tail of the sorted order.
    index = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=vocab - 1)  # (N, 1)
    return sorted_ids.gather(1, index).squeeze(1)


def filtered_probs(sorted_logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Probabilities (N, V) over logits sorted descending, zero outside each row's top-k and then
    its top-p nucleus. A token stays in the nucleus while the mass ranked strictly above it is
    below top_p, so the most likely token always stays (as transformers' TopPLogitsWarper)."""
    vocab = sorted_logits.shape[1]
    device = sorted_logits.device
    ranks = torch.arange(vocab, device=device)[None, :]  # (1, V)
    if any(k > 0 for k in top_k):
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    if any(p < 1.0 for p in top_p):
        p = torch.tensor(top_p, device=device, dtype=probs.dtype)[:, None]
        mass_above = probs.cumsum(dim=-1) - probs  # (N, V) exclusive cumulative mass
        probs = probs.masked_fill(mass_above >= p, 0.0)
    return probs


def _row_uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, (N, 1): seeded rows from their generator, the rest from the
    global RNG in a single draw."""
    if all(generator is None for generator in generators):
        return torch.rand(len(generators), 1, device=device)
    uniforms = torch.empty(len(generators), 1, device=device)
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if unseeded:
        uniforms[unseeded] = torch.rand(len(unseeded), 1, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniforms[row, 0] = torch.rand(1, generator=generator, device=device)[0]
    return uniforms
