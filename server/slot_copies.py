"""Adapter weights from the CPU tier into resident slots, asynchronously on a GPU.

On CUDA the CPU tier holds each adapter in pinned host memory, in the model dtype, so a slot write
is a DMA that overlaps compute: it runs on a side stream, and the first batch that uses the slot
makes the compute stream wait for the write's event (on the GPU, not the host). Batches that do
not use the slot never wait for it. On a CPU the write is a plain synchronous copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from adapters.lora_layer import LoraLinear
from adapters.weights import AdapterWeights, clear_slot, write_to_slot


def host_tier_weights(weights: AdapterWeights, dtype: torch.dtype, device: torch.device) -> AdapterWeights:
    """`weights` as the CPU tier keeps them: in the slots' dtype (half the bytes of fp32 in
    bf16), and pinned when the slots are on a GPU (pinned pages are what async copies need)."""
    pin = device.type == "cuda"
    tensors = {}
    for name, (lora_A, lora_B) in weights.tensors.items():
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        tensors[name] = (lora_A.pin_memory(), lora_B.pin_memory()) if pin else (lora_A, lora_B)
    return replace(weights, tensors=tensors)  # the rest (config, warnings, content hash) as read


class SlotCopier:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, torch.cuda.Event] = {}  # slot -> its last write's event

    def write(self, layers: dict[str, LoraLinear], slot: int, weights: AdapterWeights) -> None:
        """Start writing `weights` into `slot` (a CUDA write completes in the background)."""
        if self._stream is None:
            write_to_slot(layers, slot, weights)
            return
        # The slot's previous adapter may still be read by batches queued on the compute stream;
        # the copy waits for them on the GPU (the host does not block).
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            write_to_slot(layers, slot, weights, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending[slot] = event

    def clear(self, layers: dict[str, LoraLinear], slot: int) -> None:
        """Zero `slot` on the compute stream, after any write to it still in flight."""
        self.ready([slot])
        clear_slot(layers, slot)

    def ready(self, slots: Iterable[int]) -> None:
        """Before a batch that reads `slots`: order the compute stream after their writes."""
        if self._stream is None or not self._pending:
            return
        stream = torch.cuda.current_stream(self.device)
        for slot in slots:
            event = self._pending.pop(slot, None)
            if event is not None:
                stream.wait_event(event)

    @property
    def pending_slots(self) -> list[int]:
        return sorted(self._pending)


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (token ids, positions) onto `device` without a host sync: from
    pageable memory a CUDA copy waits for the stream, from pinned memory it is queued."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
