"""The serving memory budget, sized at start (DESIGN decision 8).

On a GPU the engine allocates everything a full load needs before it serves: the KV cache for
every running row at the full context, and every adapter slot at the maximum rank. This module
adds those up, with the activations of the largest step, and compares them with the share of the
device the server may use (`--gpu-memory-fraction`). A configuration that does not fit fails at
start with the numbers, never with an out-of-memory error in the middle of a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backbone.model import CausalLM

GIB = 2**30


class DeviceMemoryError(ValueError):
    """The engine's configuration does not fit the device memory it may use."""


@dataclass(frozen=True)
class MemoryPlan:
    kv_cache_bytes: int  # rows x positions x layers x 2 (keys, values) x kv_heads x head_dim
    lora_slot_bytes: int  # slots x max rank x (in + out) over every adapted module
    activation_bytes: int  # an estimate of the largest step's transient tensors
    prefix_cache_bytes: int  # the prefix cache's budget of kept KV blocks (0 when it is off)
    merged_adapter_bytes: int  # a copy of every adapted weight for the merged adapter (0 when off)
    rows: int
    positions: int
    slots: int
    max_rank: int

    @property
    def total_bytes(self) -> int:
        return (self.kv_cache_bytes + self.lora_slot_bytes + self.activation_bytes + self.prefix_cache_bytes
                + self.merged_adapter_bytes)  # fmt: skip


def plan_memory(
    model: CausalLM, rows: int, positions: int, slots: int, max_rank: int, prefill_chunk: int, prefix_cache_bytes: int = 0,
    merge_single_adapter: bool = False,
) -> MemoryPlan:
    """What the engine will allocate on the model's device besides the weights. The prefix cache
    fills up to its budget with blocks kept on the same device, so the budget counts in full; the
    blocks it keeps in idle cache rows cost nothing beyond the KV cache (server/prefix_kv.py).
    A merged adapter (adapters/merged_slot.py) holds a copy of every weight LoRA adapts."""
    config = model.config
    element = model.lm_head.weight.element_size()  # the KV cache and the slots are in the model dtype
    kv = 2 * config.num_hidden_layers * rows * config.num_key_value_heads * positions * config.head_dim * element
    modules = model.linear_modules().values()
    widths = sum(module.in_features + module.out_features for module in modules)
    merged = sum(module.weight.numel() for module in modules) * element if merge_single_adapter else 0
    lora = slots * max_rank * widths * element + slots * len(model.linear_modules()) * 4  # + fp32 scales
    # The largest step: a prefill chunk's hidden, attention and MLP activations in the model dtype,
    # and the fp32 logits the sampler works on (with a sorted copy for top-p), for every row.
    per_token = 4 * config.hidden_size + 3 * config.intermediate_size
    activations = 2 * prefill_chunk * per_token * element + 3 * max(rows, 1) * config.vocab_size * 4
    return MemoryPlan(kv, lora, activations, prefix_cache_bytes, merged, rows, positions, slots, max_rank)


def check_fits(plan: MemoryPlan, device: str, free_bytes: int, total_bytes: int, fraction: float) -> None:
    """Raise DeviceMemoryError with the numbers unless the plan fits in `fraction` of the
    device's memory, less what is already in use (the weights, other processes)."""
    if not 0 < fraction <= 1:
        raise DeviceMemoryError(f"--gpu-memory-fraction must be in (0, 1], got {fraction}")
    in_use = total_bytes - free_bytes
    available = int(fraction * total_bytes) - in_use
    if plan.total_bytes <= available:
        return
    raise DeviceMemoryError(
        f"the engine needs {plan.total_bytes / GIB:.2f} GiB on {device} (KV cache {plan.rows} rows x {plan.positions} "
        f"positions = {plan.kv_cache_bytes / GIB:.2f} GiB, LoRA slots {plan.slots} x rank {plan.max_rank} = "
        f"{plan.lora_slot_bytes / GIB:.2f} GiB, activations ~{plan.activation_bytes / GIB:.2f} GiB, prefix cache "
        f"{plan.prefix_cache_bytes / GIB:.2f} GiB, merged adapter {plan.merged_adapter_bytes / GIB:.2f} GiB) but "
        f"--gpu-memory-fraction {fraction} of {total_bytes / GIB:.2f} GiB leaves {max(available, 0) / GIB:.2f} GiB "
        f"({in_use / GIB:.2f} GiB already in use: the weights and other processes); lower --max-running, "
        "--max-context, --max-loras, --max-lora-rank or --prefix-cache-mb, pass --no-merge-single-adapter, "
        "or raise --gpu-memory-fraction"
    )


def check_device_memory(plan: MemoryPlan, device: torch.device, fraction: float) -> None:
    """On a CUDA device, check the plan against the free memory now; a CPU is not budgeted here
    (the operating system's memory is shared and pageable)."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    check_fits(plan, str(device), free, total, fraction)
