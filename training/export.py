"""Trained adapters -> PEFT folders: each task's own adapter, the shared one, and each task as one
standalone adapter that includes the shared one.

Stacking is exact: s_s B_s A_s x + s_t B_t A_t x = [B_s s_s/s | B_t s_t/s] [A_s ; A_t] x * s for
any s, so the standalone adapter has rank r_shared + r_task, alpha = rank (s = 1) and the two
scales folded into B. Modules one of the two does not target get zero rows there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.config import LoraConfig
from adapters.peft_io import save_adapter
from adapters.weights import AdapterWeights


def stack_adapters(shared: AdapterWeights, task: AdapterWeights, base_model: str | None) -> AdapterWeights:
    """One adapter equal to `shared` + `task` on every module."""
    shared_rank = max(a.shape[0] for a, _ in shared.tensors.values())
    task_rank = max(a.shape[0] for a, _ in task.tensors.values())
    rank = shared_rank + task_rank
    modules = sorted(set(shared.tensors) | set(task.tensors))
    tensors = {}
    for module in modules:
        some = (shared.tensors.get(module) or task.tensors.get(module))
        in_features, out_features = some[0].shape[1], some[1].shape[0]
        lora_A = torch.zeros(rank, in_features)
        lora_B = torch.zeros(out_features, rank)
        for (weights, offset) in ((shared, 0), (task, shared_rank)):
            if module in weights.tensors:
                part_A, part_B = weights.tensors[module]
                r = part_A.shape[0]
                lora_A[offset : offset + r] = part_A
                lora_B[:, offset : offset + r] = part_B * weights.scale(module)  # target scale is 1
        tensors[module] = (lora_A, lora_B)
    config = LoraConfig(
        r=rank, lora_alpha=float(rank), target_modules=modules, base_model_name_or_path=base_model
    )
    return AdapterWeights(config, tensors)


def export_adapters(
    folder: Path,
    adapters: dict[str, AdapterWeights],
    shared: AdapterWeights | None,
    base_model: str | None,
    write_shared: bool = True,
) -> None:
    """Write `folder/<task>/` for each task and, with a shared adapter, `folder/standalone/<task>/`
    and (unless it is frozen elsewhere on disk: `write_shared=False`) `folder/shared/`."""
    for name, weights in adapters.items():
        save_adapter(folder / name, weights)
        if shared is not None:
            save_adapter(folder / "standalone" / name, stack_adapters(shared, weights, base_model))
    if shared is not None and write_shared:
        save_adapter(folder / "shared", shared)
