"""LoRA layers that read the same input (q/k/v; gate/up) share one A stack, so decode runs their
A-sides as one matmul.

The group's stack is (S, G, r_max, in); each member's `lora_A` buffer is its (S, r_max, in) view,
as a fused base group's projections view one weight (backbone/fused_projections.py). A slot
write through one member (`set_slot`, a hot swap) is therefore what the group reads, a member's
own paths (prefill, training, other batches) see its slots exactly as before, and checkpoints keep
the per-module names.

Where it runs: decode (one token per row), each row on its own adapter only (serving), no
trained slots, every member still a view of the stack, and the batch's adapters at the slots'
full rank. Slot `s`'s A rows of all members are then one (G * r_max, in) block: one matmul gives
every member's hidden as a column slice, and each member adds its B-side to its own output. A
batch of adapters below the slots' rank runs the members one by one instead, each trimmed to the
batch's rank (a server sized for rank 64 reads rank-16 weights for rank-16 adapters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapters.lora_layer import LoraLinear
from adapters.routing import AdapterRouting


class LoraInputGroup:
    def __init__(self, members: Sequence[LoraLinear]) -> None:
        first = members[0]
        for member in members:
            if (member.num_slots, member.max_rank, member.in_features) != (first.num_slots, first.max_rank, first.in_features):
                raise ValueError(
                    f"an input group's LoRA layers need one slot count, rank and input width; got "
                    f"{[(m.num_slots, m.max_rank, m.in_features) for m in members]}"
                )
        self.members = tuple(members)
        self.stack = torch.stack([member.lora_A.detach() for member in members], dim=1)  # (S, G, r_max, in)
        for index, member in enumerate(members):
            member.lora_A = self.stack[:, index]
            member.input_group = self
        self._pointers = [member.lora_A.data_ptr() for member in members]
        self._views: dict = {}  # A blocks by slots, built once
        self._scale_cache: dict[tuple[int, int], tuple[tuple[int, ...], list[float | None] | None]] = {}

    def intact(self) -> bool:
        """Whether each member's lora_A is still its view of the stack (a `.to()` replaces them).
        The stack stays alive here, so no other tensor can start at a view's address."""
        return all(member.lora_A.data_ptr() == pointer for member, pointer in zip(self.members, self._pointers))

    def add_adapters(self, projections: Sequence, outputs: list[torch.Tensor], x: torch.Tensor, routing: AdapterRouting) -> bool:
        """Add every member's adapters' delta to its output in place, if this batch is one the
        group runs (module note); False: nothing was added, the members run one by one."""
        if x.shape[1] != 1 or not routing.own_adapters_only or projections != self.members or not self.intact():
            return False
        slot = routing.single_slot
        if slot is not None:
            return self._add_one_adapter(outputs, x, slot)
        if routing.rows_in_slot_order:
            return self._add_distinct(outputs, x, routing.active_range)
        return False

    def _scales(self, first: int, stop: int) -> list[float | None] | None:
        # Each member's one scale over slots first..stop-1 (None: it adds nothing there), or None
        # when the group does not run them: a rank below the slots' own, scales unknown or mixed,
        # trained slots. Kept until a member's slots change (set_slot and make_trainable count).
        edits = tuple(member.slot_writes for member in self.members)
        key = (first, stop)
        found = self._scale_cache.get(key)
        if found is not None and found[0] == edits:
            return found[1]
        full, scales = self.stack.shape[2], []
        if any(member.trainable_A for member in self.members):
            scales = None  # training: the members' own differentiable paths
        for member in self.members if scales is not None else ():
            ranks, distinct = set(member.slot_ranks[first:stop]), set(member.slot_scales[first:stop])
            if ranks == {0}:
                scales.append(None)
            elif ranks != {full} or len(distinct) != 1 or None in distinct:
                scales = None
                break
            else:
                scales.append(distinct.pop())
        if scales is not None and all(scale is None for scale in scales):
            scales = None  # no member adds anything: the members' own paths skip it as cheaply
        self._scale_cache[key] = (edits, scales)
        return scales

    def _add_one_adapter(self, outputs: list[torch.Tensor], x: torch.Tensor, slot: int) -> bool:
        scales = self._scales(slot, slot + 1)
        if scales is None:
            return False
        lora_A = self._views.get(slot)
        if lora_A is None:
            lora_A = self._views[slot] = self.stack[slot].flatten(0, 1)  # (G * r, in), a view
        hidden = F.linear(x.select(1, 0), lora_A).split(self.stack.shape[2], dim=1)  # G x (B, r)
        for member, out, part, scale in zip(self.members, outputs, hidden, scales):
            if scale is not None:
                lora_B_T = member.decode_view(("B", slot), lambda A, B: B[slot].T)  # (r, out)
                out.select(1, 0).addmm_(part, lora_B_T, alpha=scale)
        return True

    def _add_distinct(self, outputs: list[torch.Tensor], x: torch.Tensor, span: slice) -> bool:
        scales = self._scales(span.start, span.stop)
        if scales is None:
            return False
        key = (span.start, span.stop)
        lora_A_T = self._views.get(key)
        if lora_A_T is None:
            lora_A_T = self._views[key] = self.stack[span].flatten(1, 2).transpose(1, 2)  # (U, in, G * r)
        hidden = torch.bmm(x, lora_A_T).split(self.stack.shape[2], dim=2)  # G x (U, 1, r)
        for member, out, part, scale in zip(self.members, outputs, hidden, scales):
            if scale is not None:
                lora_B_T = member.decode_view(("B",) + key, lambda A, B: B[span].transpose(1, 2))  # (U, r, out)
                out.baddbmm_(part, lora_B_T, alpha=scale)
        return True


def group_layers(layers: Sequence[LoraLinear]) -> LoraInputGroup | None:
    """Group `layers` (which read one input), or leave them apart when they cannot share a stack."""
    first = layers[0]
    if len(layers) < 2 or any(
        (m.num_slots, m.max_rank, m.in_features, m.lora_A.dtype, m.lora_A.device)
        != (first.num_slots, first.max_rank, first.in_features, first.lora_A.dtype, first.lora_A.device)
        for m in layers
    ):
        return None
    return LoraInputGroup(layers)


def group_lora_inputs(model: nn.Module) -> int:
    """Group every decoder layer's q/k/v and gate/up LoRA layers (idempotent); returns the groups
    made. A set with a projection that is not a LoRA layer (an adapter on q and v only) stays
    ungrouped."""
    made = 0
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for projections in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
            if not all(isinstance(p, LoraLinear) for p in projections):
                continue
            group = projections[0].input_group
            if group is not None and group.members == projections and group.intact():
                continue
            if group_layers(projections) is not None:
                made += 1
    return made
