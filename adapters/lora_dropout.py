"""LoRA dropout: the adapter's input, never the base path, zeroed element-wise at each row's rate
and rescaled by 1 / (1 - p), as PEFT's `lora_B(lora_A(dropout(x)))`. Training only.

Rows of a mixed batch belong to different adapters, so the rate is per row (the rate of the row's
adapter); the shared adapter draws its own mask at its own rate, as a second PEFT adapter would.
"""

from __future__ import annotations

import torch


def adapter_dropout(x: torch.Tensor, rates: torch.Tensor | float | None) -> torch.Tensor:
    """(B, T, in) -> x with each element kept with probability 1 - p_row, kept values / (1 - p_row).

    `rates` is one rate for every row or a (B,) tensor of per-row rates; None or all zero returns
    `x` itself and draws no random numbers, so p = 0 changes nothing (not even the RNG stream)."""
    if rates is None:
        return x
    if not isinstance(rates, torch.Tensor):
        if rates == 0.0:
            return x
        rates = torch.full((x.shape[0],), float(rates), device=x.device)
    if not bool((rates > 0).any()):
        return x
    keep = (1.0 - rates).to(device=x.device, dtype=x.dtype)[:, None, None]  # (B, 1, 1)
    mask = torch.rand(x.shape, device=x.device, dtype=x.dtype) < keep  # (B, T, in)
    return x * mask / keep
