"""AdamW over the adapter parameters, the learning-rate schedule, and layer-wise LR decay.

Decoupled weight decay (AdamW) applies to matrices only: biases and norm weights (1-D) get none.
Layer-wise decay multiplies the LR of decoder layer l (of L) by decay^(L-1-l): the top layer
trains at the base LR, lower layers slower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class OptimConfigError(ValueError):
    """Optimiser or schedule settings out of range."""


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The factor on the peak LR at optimiser step `step` (0-based): linear warm-up from 0 to 1
    over `warmup_steps`, then `schedule` down to `min_lr_ratio` (the floor) at `total_steps`."""
    if schedule not in SCHEDULES:
        raise OptimConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def layer_of(name: str) -> int | None:
    """The decoder layer index in a module/parameter name (`model.layers.3.mlp...` -> 3)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    num_layers: int,
    layer_decay: float = 1.0,
) -> list[dict]:
    """AdamW groups keyed by (layer LR, decays or not); each group records its `base_lr`."""
    if not 0.0 < layer_decay <= 1.0:
        raise OptimConfigError(f"optimizer.layer_decay must be in (0, 1], got {layer_decay}; 1 disables it")
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in named_params:
        layer = layer_of(name)
        depth_from_top = 0 if layer is None else num_layers - 1 - layer
        group_lr = lr * layer_decay**depth_from_top
        decays = param.ndim >= 2  # no decay on biases and norms
        key = (group_lr, decays)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": group_lr, "base_lr": group_lr,
                           "weight_decay": weight_decay if decays else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(
    groups: list[dict], betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per tensor instead of a dozen) where torch has it for the
    parameters' device: a mixed-task run holds a LoRA pair per task per module, thousands of small
    tensors, and the unfused CPU step spent seconds on them (the same update to rounding)."""
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
