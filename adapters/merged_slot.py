"""One adapter merged into a copy of the base weights, for batches whose rows are all on it.

A batch with every row on one adapter pays LoRA's two small matmuls in each of the ~210
projections on top of the base. At r=16 they are 4.6% of the base's arithmetic, but with their
call overhead and the Python around them one adapter ran at 0.93 of the base. With the adapter
merged into a copy of each weight (W + scale * B A, PEFT's merge), such a batch costs exactly what
the base costs. The unmerged weights stay, so a mixed batch in the next step runs as before: the
switch between merged and unmerged inference of dLoRA (OSDI '24).

`SlotMerger` merges once one adapter has had the whole batch for `after_batches` batches in a row,
so a passing single-adapter batch never pays for it, and it merges a budget of weight elements per
batch, so no step stalls for the whole merge; layers merged so far serve merged meanwhile. One
adapter is merged at a time, into copies allocated when the merger is made: the price is one more
copy of the adapted weights, from the start (server/device_memory.py counts it).

A merged weight serves only while what it was computed from is unchanged (`MergedWeight.stamp`):
the base weight, the slot's contents, rank and scale. A hot swap into the slot, a write into the
stacks that bypasses `set_slot`, a replaced buffer: each sends the layer back to the unmerged
path until the merger merges it again, so a merged weight is never stale, only sometimes absent.
Loading other adapters into other slots leaves it alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.lora_layer import LoraLinear
from adapters.routing import AdapterRouting
from backbone.fused_projections import FusedGroup
from backbone.model import CausalLM

log = logging.getLogger(__name__)

# Batches in a row on one adapter before merging starts: a server alternating between adapters
# every few steps does not pay for merges it would never use.
MERGE_AFTER_BATCHES = 4
# Weight elements merged per batch: the default model's ~106M adapted weights in four batches, each
# paying about a quarter of a decode step for it on two cores.
MERGE_ELEMENTS_PER_BATCH = 32 * 2**20


def _layer_stamp(layer: LoraLinear, slot: int) -> tuple | None:
    """What a merge of `slot` into `layer` is computed from; None where it cannot be merged
    (a scale known only on the device, slots under training, stacks written past `set_slot`,
    tensors without version counters)."""
    scale = layer.slot_scales[slot]
    if scale is None or layer.trainable_A:
        return None
    versions = layer.known_versions
    if versions is None or versions != layer._stack_versions():
        return None
    weight = layer.weight
    try:
        # The base weight's version moves with every in-place write (an adapter merged into the
        # base), the data pointers with replaced tensors, `slot_writes` with a write into this slot.
        return (weight.data_ptr(), weight._version, layer.lora_A.data_ptr(), layer.lora_B.data_ptr(),
                layer.slot_writes[slot], scale, layer.slot_ranks[slot])  # fmt: skip
    except RuntimeError:  # an inference tensor keeps no version counter: nothing tells a change
        return None


def unit_stamp(layers: Sequence[LoraLinear], slot: int) -> tuple | None:
    stamps = tuple(_layer_stamp(layer, slot) for layer in layers)
    return None if None in stamps else stamps


@dataclass
class MergedWeight:
    """`weight` = the base weight of `layers` (end to end for a fused group) plus slot `slot`'s
    scaled delta, as of `stamp`."""

    slot: int
    stamp: tuple
    weight: torch.Tensor

    def weight_for(self, routing: AdapterRouting | None, layers: Sequence[LoraLinear]) -> torch.Tensor | None:
        """The merged weight if it serves this batch exactly: every row on its slot, nothing but
        the rows' own adapters, and nothing changed since the merge. Else None (the unmerged path)."""
        if routing is None or routing.single_slot != self.slot or not routing.own_adapters_only:
            return None
        return self.weight if unit_stamp(layers, self.slot) == self.stamp else None


class MergeUnit:
    """A weight that serves one matmul: a LoRA layer's own, or a fused group's (q/k/v, gate/up),
    merged as one so the group stays one matmul. `owner.merged` holds its MergedWeight."""

    def __init__(self, layers: Sequence[LoraLinear], group: FusedGroup | None = None) -> None:
        self.layers = tuple(layers)
        self.group = group
        self.owner = group if group is not None else layers[0]
        # The copy merges are written into, allocated and touched now: the memory is taken when
        # the server starts, as the memory plan counts it, and no request waits on its page faults.
        # Outside inference mode, so the copy keeps a version counter, which packed bf16 weights
        # (backbone/packed_linear.py) read to tell when to repack it.
        with torch.inference_mode(False):
            self.copy = torch.zeros_like(self.owner.weight, requires_grad=False)

    def _stamp_to_merge(self, slot: int) -> tuple | None:
        """The stamp a merge of `slot` would carry, or None where there is nothing to merge."""
        if self.group is not None and not self.group.intact(self.layers):
            return None  # the group runs its projections one by one now, unmerged
        if all(layer.slot_ranks[slot] == 0 for layer in self.layers):
            return None  # the adapter does not touch this weight: the unmerged path costs the base
        stamp = unit_stamp(self.layers, slot)
        merged = self.owner.merged
        if stamp is None or (merged is not None and merged.slot == slot and merged.stamp == stamp):
            return None  # not mergeable, or merged already
        return stamp

    def needs_merge(self, slot: int) -> bool:
        """Whether merging `slot` here would change what serves it: mergeable, and not merged yet."""
        return self._stamp_to_merge(slot) is not None

    def merge(self, slot: int) -> int:
        """Merge `slot` into this unit's copy where it `needs_merge`; returns the elements written."""
        stamp = self._stamp_to_merge(slot)
        if stamp is None:
            return 0
        base, target = self.owner.weight, self.copy
        self.owner.merged = None  # half-written, it serves nothing
        with torch.inference_mode(False), torch.no_grad():
            if (target.shape, target.dtype, target.device) != (base.shape, base.dtype, base.device):  # a replaced weight
                target = self.copy = torch.empty_like(base)
            start = 0
            for layer in self.layers:
                rows = slice(start, start + layer.out_features)
                rank = layer.slot_ranks[slot]
                if rank == 0:
                    target[rows].copy_(base[rows])
                else:
                    lora_B, lora_A = layer.lora_B[slot, :, :rank], layer.lora_A[slot, :rank]
                    torch.addmm(base[rows], lora_B, lora_A, alpha=layer.slot_scales[slot], out=target[rows])
                start += layer.out_features
        self.owner.merged = MergedWeight(slot, stamp, target)
        return base.numel()


def merge_units(model: CausalLM) -> list[MergeUnit]:
    """Every LoRA weight of `model` as merge units: fused groups whole, other layers alone."""
    units: list[MergeUnit] = []
    grouped: set[int] = set()
    for block in model.model.layers:
        attention, mlp = block.self_attn, block.mlp
        for group, projections in (
            (attention.fused_qkv, (attention.q_proj, attention.k_proj, attention.v_proj)),
            (mlp.fused_gate_up, (mlp.gate_proj, mlp.up_proj)),
        ):
            if group is not None and all(isinstance(p, LoraLinear) for p in projections):
                units.append(MergeUnit(projections, group))
                grouped.update(id(p) for p in projections)
    units += [MergeUnit([m]) for m in model.modules() if isinstance(m, LoraLinear) and id(m) not in grouped]
    return units


@dataclass
class MergeStats:
    batches: int  # batches whose every adapted weight was merged (they ran at the base's cost)
    seconds: float  # time spent merging
    nbytes: int  # memory held by the copies merges are written into


class SlotMerger:
    """Decides, batch by batch, whether to merge and what (see the module note)."""

    def __init__(
        self, model: CausalLM, after_batches: int = MERGE_AFTER_BATCHES, elements_per_batch: int = MERGE_ELEMENTS_PER_BATCH
    ) -> None:
        if after_batches < 1 or elements_per_batch < 1:
            raise ValueError("after_batches and elements_per_batch must be >= 1")
        self.units = merge_units(model)
        self.after_batches = after_batches
        self.elements_per_batch = elements_per_batch
        self._streak_slot: int | None = None
        self._streak = 0
        self._batches = 0
        self._seconds = 0.0
        self._failed = False  # a merge raised (out of memory, say): batches run unmerged from then on
        self._merging: tuple[int, int, float] | None = None  # slot, elements, seconds of the merge under way

    def before_batch(self, routing: AdapterRouting | None) -> None:
        """Called with each batch's routing before its forward: merges some of the units when
        one adapter has had the whole batch long enough."""
        slot = routing.single_slot if routing is not None and routing.own_adapters_only else None
        if slot is None or self._failed:
            self._streak_slot, self._streak = None, 0
            return
        self._streak = self._streak + 1 if slot == self._streak_slot else 1
        self._streak_slot = slot
        if self._streak < self.after_batches:
            return
        started = time.perf_counter()
        budget = self.elements_per_batch
        complete = True
        for unit in self.units:
            if budget <= 0:
                if unit.needs_merge(slot):
                    complete = False  # the next batch goes on from here
                    break
                continue
            try:
                budget -= unit.merge(slot)  # 0 where there is nothing to merge
            except Exception:  # the batch must not fail for an optimisation: it runs unmerged
                log.exception("merging an adapter into a copy of the weights failed; single-adapter batches run unmerged")
                self._failed, complete = True, False
                break
        seconds = time.perf_counter() - started
        self._seconds += seconds
        self._batches += complete
        self._report(slot, self.elements_per_batch - budget, seconds, complete)

    def _report(self, slot: int, elements: int, seconds: float, complete: bool) -> None:
        # One log line per merge, when it is whole, however many batches it took.
        if elements == 0 and self._merging is None:
            return
        merging = self._merging if self._merging is not None and self._merging[0] == slot else (slot, 0, 0.0)
        merging = (slot, merging[1] + elements, merging[2] + seconds)
        self._merging = None if complete else merging
        if complete:
            log.info(
                "slot %d's adapter merged into a copy of the weights: %.1fM weights in %.0f ms; batches all on it "
                "now run at the base model's cost", slot, merging[1] / 1e6, merging[2] * 1e3,
            )

    def stats(self) -> MergeStats:
        nbytes = sum(unit.copy.numel() * unit.copy.element_size() for unit in self.units)
        return MergeStats(self._batches, self._seconds, nbytes)
