"""Rotary position embeddings (RoPE) with the `linear` and `llama3` frequency scalings."""

from __future__ import annotations

import math

import torch

from backbone.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The per-pair rotation frequencies, (head_dim/2,), scaled as the config asks."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (same formula as transformers' `_compute_llama3_parameters`).
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for each position, (B, 1, T, head_dim), ready to broadcast over heads.

    Computed in fp32 (inv_freq stays fp32 in every model dtype): position * frequency reaches
    thousands of radians, where bf16 keeps no fractional part. The result is cast to the
    activations' dtype only at use (apply_rotary), as the reference does."""
    angles = positions[..., None].to(inv_freq.dtype) * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hd) by the half-split convention Hugging Face checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
