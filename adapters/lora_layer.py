"""One LoRA linear layer for training and serving (DESIGN decision 2).

The frozen base weight plus stacked adapter slots: A (S, r_max, in), B (S, out, r_max) and
scale (S,). An adapter of rank r < r_max fills the first r rows of A / columns of B; the rest stay
zero, so padding changes nothing. Each row of a batch picks its slot through the routing passed
with the call; -1 means the base alone.

Precision: the slot stacks are in the base weight's dtype (what serving reads); the scales stay
fp32 (alpha/sqrt(r) is not exact in bf16). Trainable slots are fp32 parameters (PEFT's and
torchtune's practice: the optimizer's small updates would vanish in bf16) and are cast to the
activations' dtype where they are used, so the matmuls run in the model dtype while gradients
flow back into the fp32 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.binned_grad import TaskGradSink, binned_shared_delta
from adapters.lora_dropout import adapter_dropout
from adapters.routing import AdapterRouting
from backbone.model import Projection
from backbone.packed_linear import linear


class LoraLinear(Projection):
    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared with the base model: frozen, never copied
        self.bias = base.bias
        device, dtype = base.weight.device, base.weight.dtype
        self.register_buffer("lora_A", torch.zeros(num_slots, max_rank, self.in_features, device=device, dtype=dtype))
        self.register_buffer("lora_B", torch.zeros(num_slots, self.out_features, max_rank, device=device, dtype=dtype))
        self.register_buffer("lora_scale", torch.zeros(num_slots, device=device, dtype=torch.float32))
        # Training only: slots whose A/B are parameters (str(slot) -> tensor), and the per-task
        # gradient bins of the shared slot.
        self.trainable_A = nn.ParameterDict()
        self.trainable_B = nn.ParameterDict()
        self.task_grads: TaskGradSink | None = None
        # Rank of each slot's adapter, on the host: a batch computes only up to the largest rank
        # among its adapters, so a server sized for rank 64 pays rank-16 cost for rank-16 adapters.
        # Full rank until set_slot says otherwise, so a direct write to the buffers stays exact.
        self.slot_ranks = [max_rank] * num_slots
        # Each slot's scale on the host, as set_slot wrote it (None = unknown, e.g. buffers written
        # directly): decode then folds the scale into a matmul's alpha instead of a separate multiply.
        self.slot_scales: list[float | None] = [None] * num_slots
        # Serving's views of the stacks by (slots, rank), built once rather than in every layer of
        # every step (at r=16 the Python work around decode's two matmuls took as long as they
        # did). Kept with the stacks they view, so replaced buffers (a `.to()`, an assignment)
        # are never read through stale views.
        self._decode_views: tuple[torch.Tensor, torch.Tensor, dict] = (self.lora_A, self.lora_B, {})
        # A copy of the weight with one slot merged in, for batches all on that slot
        # (adapters/merged_slot.py); a fused group holds its own instead.
        self.merged = None
        # Writes through set_slot, per slot, and the stacks' versions after the last of them: a
        # merge of one slot stays valid through writes into other slots, and a write that bypasses
        # set_slot shows as versions the layer does not know.
        self.slot_writes = [0] * num_slots
        self.known_versions = self._stack_versions()

    @property
    def num_slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    # ---- slot contents -------------------------------------------------------------------

    def set_slot(
        self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scale: float, non_blocking: bool = False
    ) -> None:
        """Write one adapter's (r, in) / (out, r) weights into `slot`; None clears the slot (an
        adapter that does not target this module adds nothing here). `non_blocking`: copies from
        pinned host memory are queued on the current CUDA stream (server/slot_copies.py)."""
        self.slot_writes[slot] += 1
        try:
            self._write_slot(slot, lora_A, lora_B, scale, non_blocking)
        finally:
            self.known_versions = self._stack_versions()

    def _stack_versions(self) -> tuple[int, int, int] | None:
        try:
            return self.lora_A._version, self.lora_B._version, self.lora_scale._version
        except RuntimeError:  # inference tensors keep no version counter
            return None

    def _write_slot(
        self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scale: float, non_blocking: bool
    ) -> None:
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.lora_scale[slot] = 0.0
            self.slot_ranks[slot] = 0
            self.slot_scales[slot] = 0.0
            if lora_A is None or lora_B is None:
                return
            rank = lora_A.shape[0]
            if rank > self.max_rank:
                raise ValueError(f"adapter rank {rank} exceeds this layer's maximum {self.max_rank}")
            self.lora_A[slot, :rank].copy_(lora_A, non_blocking=non_blocking)
            self.lora_B[slot, :, :rank].copy_(lora_B, non_blocking=non_blocking)
            self.lora_scale[slot] = scale
            self.slot_ranks[slot] = rank
            self.slot_scales[slot] = float(scale)

    def make_trainable(self, slot: int) -> None:
        """Turn `slot` into fp32 parameters with gradients (initialised from the buffers)."""
        self.trainable_A[str(slot)] = nn.Parameter(self.lora_A[slot].float().clone())
        self.trainable_B[str(slot)] = nn.Parameter(self.lora_B[slot].float().clone())
        self.slot_ranks[slot] = self.max_rank  # training may fill any row

    def freeze_trainable(self) -> None:
        """Copy trained parameters back into the buffers and drop them."""
        with torch.no_grad():
            for key in list(self.trainable_A):
                self.lora_A[int(key)].copy_(self.trainable_A[key])
                self.lora_B[int(key)].copy_(self.trainable_B[key])
        self.trainable_A.clear()
        self.trainable_B.clear()

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (r_max, in) / (out, r_max) weights of a slot, trained values included."""
        key = str(slot)
        if key in self.trainable_A:
            return self.trainable_A[key], self.trainable_B[key]
        return self.lora_A[slot], self.lora_B[slot]

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.trainable_A:
            return self.lora_A, self.lora_B
        # Differentiable stack in the model dtype: trained slots (fp32) carry gradients through
        # the cast, the rest are constants.
        slots, dtype = range(self.num_slots), self.lora_A.dtype
        return (
            torch.stack([self.slot_weights(s)[0].to(dtype) for s in slots]),
            torch.stack([self.slot_weights(s)[1].to(dtype) for s in slots]),
        )

    # ---- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, routing: AdapterRouting | None = None) -> torch.Tensor:
        merged = self.merged.weight_for(routing, (self,)) if self.merged is not None else None
        if merged is not None:  # every row on the adapter merged into this copy: the base's cost
            return linear(x, merged, self.bias)
        # The base through its packed weight where that is faster with the same bits (bf16 on a CPU).
        return self.add_adapters(linear(x, self.weight, self.bias), x, routing)

    def add_adapters(self, out: torch.Tensor, x: torch.Tensor, routing: AdapterRouting | None) -> torch.Tensor:
        """The base output `out` plus the routed adapters' delta for `x`. `out` may be a slice of a
        fused q/k/v or gate/up output (backbone/fused_projections.py); it is updated in place."""
        if routing is None:
            return out
        if routing.own_adapters_only and not self.trainable_A:
            added = self._add_plain_serving_delta(out, x, routing)
            if added is not None:
                return added
        # Rank 0: none of the batch's adapters targets this module (e.g. q/v-only adapters on an MLP).
        rank = max((self.slot_ranks[slot] for slot in routing.active_list), default=0)
        # LoRA dropout touches the adapters' input only, and only while training.
        dropping = self.training and routing.dropout is not None
        if rank > 0:
            row_x = adapter_dropout(x, routing.dropout.row_rates) if dropping else x
            if routing.slot_spans is not None and x.shape[1] > 1:
                out = self._add_slot_span_delta(out, row_x, routing.slot_spans)
            else:
                lora_A, lora_B = self._stacks()
                out = self._add_per_row_delta(out, row_x, routing, lora_A[:, :rank], lora_B[:, :, :rank])
        if routing.shared_slot is not None:
            shared_x = adapter_dropout(x, routing.dropout.shared_rate) if dropping else x
            # The shared slot's own weights (fp32 when trained), not the stack's cast copy, so its
            # per-task gradient bins are computed against the parameters themselves.
            out = out + self._shared_delta(shared_x, routing, *self.slot_weights(routing.shared_slot))
        return out

    def _decode_view(self, key: tuple, make):
        """`make(lora_A, lora_B)`, a view of the stacks, built once per `key` (decode's hot path)."""
        lora_A, lora_B, views = self._decode_views
        if lora_A is not self.lora_A or lora_B is not self.lora_B:
            lora_A, lora_B, views = self._decode_views = (self.lora_A, self.lora_B, {})
        found = views.get(key)
        if found is None:
            found = views[key] = make(lora_A, lora_B)
        return found

    def _add_plain_serving_delta(self, out, x, routing: AdapterRouting) -> torch.Tensor | None:
        # Serving's two usual batches with the least Python per layer (at r=16 the matmuls take
        # microseconds, so the work around them counts): every row on one adapter, or every row
        # on its own adapter in slot order. Views of the stacks, no per-row weight gathers (a
        # prefill step gathered a copy of A and B per row in every projection), and the scale
        # rides on the matmul's alpha. None: the batch needs the general path (rows on the base,
        # scales unknown or differing, a strided output of a multi-token step).
        slot = routing.single_slot
        if slot is not None:
            rank, scale = self.slot_ranks[slot], self.slot_scales[slot]
            if rank == 0:
                return out
            if scale is None:
                return None
            lora_A, lora_B_T = self._decode_view((slot, rank), lambda A, B: (A[slot, :rank], B[slot, :, :rank].T))
            if x.shape[1] == 1:
                hidden = F.linear(x.select(1, 0), lora_A)  # (B, r)
                out.select(1, 0).addmm_(hidden, lora_B_T, alpha=scale)  # (B, out), a view of out
                return out
            if not out.is_contiguous():
                return None  # a slice of a fused output: no flat view to accumulate into
            hidden = F.linear(x, lora_A)  # (B, T, r)
            out.view(-1, out.shape[-1]).addmm_(hidden.reshape(-1, rank), lora_B_T, alpha=scale)
            return out
        if not routing.rows_in_slot_order:
            return None
        span = routing.active_range
        rank = max(self.slot_ranks[span])
        if rank == 0:
            return out
        scales = self.slot_scales[span]
        scale = scales[0]
        if scale is None or scales.count(scale) != len(scales):
            return None
        lora_A_T, lora_B_T = self._decode_view(
            (span.start, span.stop, rank), lambda A, B: (A[span, :rank].transpose(1, 2), B[span, :, :rank].transpose(1, 2))
        )
        return out.baddbmm_(torch.bmm(x, lora_A_T), lora_B_T, alpha=scale)  # (B, T, out) in place

    def _add_per_row_delta(self, out, x, routing: AdapterRouting, lora_A, lora_B) -> torch.Tensor:
        if x.shape[1] == 1:
            return self._add_grouped_decode_delta(out, x, routing, lora_A, lora_B)
        # Prefill and training: gathering each row's own A/B costs the least compute, and nothing
        # is computed for adapters a row does not use.
        slots = routing.slot_ids.clamp(min=0)
        scale = (self.lora_scale[slots] * (routing.slot_ids >= 0)).to(x.dtype)  # rows on the base get 0
        hidden = torch.bmm(x, lora_A.index_select(0, slots).transpose(1, 2)) * scale[:, None, None]  # (B, T, r)
        # Accumulate into the base output in place: the (B, T, out) delta is never materialised,
        # which saves two full passes over the output (F.linear's backward does not need `out`).
        # index_select, not fancy indexing: its backward is a fast index_add, not a scatter.
        return out.baddbmm_(hidden, lora_B.index_select(0, slots).transpose(1, 2))

    def _add_slot_span_delta(self, out, x, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        # Rows ordered by adapter (training's batches): each adapter's rows are one slice, so its
        # delta is two matmuls on views, accumulated into the base output in place. No per-row
        # weight gathers, no stack of all slots, and the weight gradients land directly on each
        # slot's own (fp32, when trained) parameters.
        width = out.shape[-1]
        for slot, start, stop in spans:
            rank = self.slot_ranks[slot] if slot >= 0 else 0
            if rank == 0:
                continue
            lora_A, lora_B = self.slot_weights(slot)
            hidden = x[start:stop] @ lora_A[:rank].to(x.dtype).T  # (n, T, r)
            scale = self.slot_scales[slot]
            if scale is None:
                hidden, scale = hidden * self.lora_scale[slot].to(x.dtype), 1.0
            out[start:stop].view(-1, width).addmm_(hidden.view(-1, rank), lora_B[:, :rank].to(x.dtype).T, alpha=scale)
        return out

    def _add_grouped_decode_delta(self, out, x, routing: AdapterRouting, lora_A, lora_B) -> torch.Tensor:
        # One token per row, rows grouped by adapter (routing.group_rows, as SGMV groups them):
        # gather the rows' inputs into (U, m, in), two batched matmuls against each adapter's own
        # A and B (views of the stacks when the slots are consecutive), and add each row's delta
        # back. Each adapter's weights are read once and no row computes an adapter it does not
        # use: the dense alternative (every row through every adapter, then masked) cost 1.8x
        # the LoRA time of this with 4 adapters over 16 rows (bench/lora_layer.py). Pads (row 0,
        # for adapters with fewer than m rows) are zeroed, so they add exactly nothing.
        used, width = len(routing.active_list), routing.group_width
        index = routing.active_range if routing.active_range is not None else routing.active_slots
        rows = x.select(1, 0).index_select(0, routing.group_rows).view(used, width, -1)
        hidden = torch.bmm(rows, lora_A[index].transpose(1, 2))  # (U, m, r)
        if routing.group_pad is not None:
            hidden.mul_(routing.group_pad)
        scales = {self.slot_scales[slot] for slot in routing.active_list}
        scale = scales.pop() if len(scales) == 1 else None
        if scale is None:  # scales differ, or are known only in the buffer
            hidden.mul_(self.lora_scale[index].to(x.dtype)[:, None, None])
            scale = 1.0
        delta = torch.bmm(hidden, lora_B[index].transpose(1, 2))  # (U, m, out)
        out.select(1, 0).index_add_(0, routing.group_rows, delta.view(used * width, -1), alpha=scale)
        return out

    def _shared_delta(self, x, routing: AdapterRouting, shared_A, shared_B) -> torch.Tensor:
        scale = float(self.lora_scale[routing.shared_slot])
        if routing.task_ids is not None and self.task_grads is not None and torch.is_grad_enabled():
            # Training's slot spans are its task spans too (task t trains slot t).
            spans = routing.slot_spans if x.shape[1] > 1 else None
            return binned_shared_delta(x, shared_A, shared_B, scale, routing.task_ids, self.task_grads, spans)
        return (x @ shared_A.to(x.dtype).T) @ shared_B.to(x.dtype).T * scale


def reference_lora_forward(layer: LoraLinear, x: torch.Tensor, routing: AdapterRouting) -> torch.Tensor:
    """The plain definition, one row at a time: base + scale_s * x A_s^T B_s^T (+ shared)."""
    outputs = []
    for row in range(x.shape[0]):
        out = F.linear(x[row], layer.weight, layer.bias)
        slots = [int(routing.slot_ids[row])] + ([routing.shared_slot] if routing.shared_slot is not None else [])
        for slot in slots:
            if slot < 0:
                continue
            lora_A, lora_B = layer.slot_weights(slot)
            out = out + (x[row] @ lora_A.T) @ lora_B.T * layer.lora_scale[slot]
        outputs.append(out)
    return torch.stack(outputs)
