"""Where and in what precision a training run computes (DESIGN decision 8).

The frozen base is in the run's dtype (bf16/fp16 on a GPU); LoRA parameters and AdamW's state are
fp32 (adapters/lora_layer.py), the loss is fp32 (training/step.py). An fp16 base needs a gradient
scaler: fp16 activation gradients underflow below 6e-8, bf16's do not (same exponent range as fp32).
"""

from __future__ import annotations

import resource
import sys

import torch

from backbone.model import CausalLM
from backbone.precision import Precision, resolve_precision

# A library caller (tests, benchmarks) that sets neither key keeps the exact fp32 CPU path;
# `loraplex train` passes `auto` unless the config or a flag says otherwise.
LIBRARY_DEVICE, LIBRARY_DTYPE = "cpu", "float32"


def training_precision(device: str | None, dtype: str | None) -> Precision:
    """The config's `device`/`dtype` (None = the library default, cpu + float32)."""
    return resolve_precision(device or LIBRARY_DEVICE, dtype or LIBRARY_DTYPE)


def model_precision(model: CausalLM) -> tuple[torch.device, torch.dtype]:
    return model.inv_freq.device, model.lm_head.weight.dtype


def grad_scaler_for(model: CausalLM) -> torch.amp.GradScaler | None:
    """A gradient scaler for an fp16 base, else None."""
    device, dtype = model_precision(model)
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes allocated on a CUDA device since the last reset; on a CPU the process's peak
    resident set (all of its memory, the model included)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
