"""Greedy decisions of a low-precision model made with fp32 logits where they matter.

A bf16 matmul accumulates in fp32 but rounds its output to bf16: 8 bits of mantissa, so a logit
near 16 is known to 0.125. The top two tokens of a step are often closer than that, and the
rounding then picks the argmax, not the model: on the default model's fixed 16-prompt set
(bench/serve_workloads.py) only 11 of 16 greedy continuations of 16 tokens matched fp32, and
13 of 16 with an fp32 lm_head (the rest of the model in bf16). Recomputing only the top few
candidates in fp32 gives the same 13 of 16 at the cost of k dot products per row, where an fp32
lm_head would double the largest matmul of the step.
"""

from __future__ import annotations

import torch

# Candidates recomputed per row. The true argmax is among the bf16 top 8 unless the bf16 logits
# are off by more than the gap to the 8th token, far beyond their rounding.
REFINED_CANDIDATES = 8


def refine_top_logits(
    logits: torch.Tensor,  # (..., V) in the model's low-precision dtype
    hidden: torch.Tensor,  # (..., hidden) the lm_head's input
    weight: torch.Tensor,  # (V, hidden)
    bias: torch.Tensor | None,
    candidates: int = REFINED_CANDIDATES,
) -> torch.Tensor:
    """fp32 logits: each row's top `candidates` recomputed in fp32 from the same (low-precision)
    weights and hidden state, the others the low-precision values widened."""
    top = logits.topk(min(candidates, logits.shape[-1]), dim=-1).indices  # (..., k)
    rows = weight[top].float()  # (..., k, hidden)
    exact = (rows @ hidden.float()[..., :, None])[..., 0]  # (..., k)
    if bias is not None:
        exact = exact + bias[top].float()
    return logits.float().scatter_(-1, top, exact)
