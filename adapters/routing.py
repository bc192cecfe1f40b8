"""The per-batch adapter routing every LoRA layer reads: which slot serves each row."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass
class DropoutRates:
    """LoRA dropout of one training batch: each row's adapter rate and the shared adapter's."""

    row_rates: torch.Tensor | None  # (B,) float; None = no dropout on the rows' own adapters
    shared_rate: float = 0.0


@dataclass
class AdapterRouting:
    """Travels with one forward call (never stored on modules), so concurrent batches are apart.

    slot_ids: (B,) long, the resident slot of each row's adapter; -1 = the base model only.
    shared_slot: a slot added to every row on top of its own (training's shared adapter).
    task_ids: (B,) long, each row's task, with `num_tasks`: the shared slot's backward then also
      bins its weight gradients per task (gradient surgery from one backward pass).
    dropout: LoRA dropout rates (training); layers apply them only in training mode.
    slot_spans: (slot, start, stop) per adapter when the rows are ordered by slot, so each
      adapter's rows are one slice (training orders its batches so): layers then run each
      adapter on a view of its rows instead of gathering weights per row.
    """

    slot_ids: torch.Tensor
    shared_slot: int | None = None
    task_ids: torch.Tensor | None = None
    num_tasks: int = 0
    dropout: DropoutRates | None = None
    slot_spans: list[tuple[int, int, int]] | None = None
    # Derived once per batch, reused by every layer: the distinct slots in use and, for each
    # row, its position among them.
    active_slots: torch.Tensor = field(init=False)
    row_to_active: torch.Tensor = field(init=False)
    rows_on_adapters: int = field(init=False)  # rows with a slot of their own (not -1)
    active_mask: torch.Tensor = field(init=False)  # (B, U) one-hot: row b uses active adapter u
    active_list: list[int] = field(init=False)  # active_slots on the host, read once per batch
    # The active slots as a slice when they are consecutive (the slot manager fills slots in
    # order), so layers can take views of their stacks instead of gathering.
    active_range: slice | None = field(init=False)
    # When every row on an adapter has an adapter of its own in consecutive slots: the row of each
    # of those slots, in slot order. Decode then runs each row through views of its own weights.
    rows_by_slot: torch.Tensor | None = field(init=False)
    # rows_by_slot is 0..B-1: row b is on the b-th slot of active_range, so decode needs neither
    # a gather of the rows' inputs nor a scatter of their deltas (the engine's usual full batch
    # when requests took cache rows and slots in the same order).
    rows_in_slot_order: bool = field(init=False)
    # The one slot of a batch whose rows are all on the same adapter (none on the base), else None:
    # decode's cheapest case, two matmuls on views of that slot.
    single_slot: int | None = field(init=False)
    # Each row adds only its own adapter (no shared slot, no dropout): serving's batches, and the
    # condition for the decode fast paths.
    own_adapters_only: bool = field(init=False)

    def __post_init__(self) -> None:
        self.slot_ids = self.slot_ids.long()
        used = self.slot_ids[self.slot_ids >= 0]
        self.rows_on_adapters = int(used.numel())
        self.active_slots, inverse = torch.unique(used, return_inverse=True)
        self.row_to_active = torch.full_like(self.slot_ids, -1)
        self.row_to_active[self.slot_ids >= 0] = inverse
        in_use = torch.arange(self.active_slots.numel(), device=self.slot_ids.device)
        self.active_mask = (self.row_to_active[:, None] == in_use).float()
        self.active_list = self.active_slots.tolist()
        first = self.active_list[0] if self.active_list else 0
        consecutive = self.active_list == list(range(first, first + len(self.active_list)))
        self.active_range = slice(first, first + len(self.active_list)) if self.active_list and consecutive else None
        self.rows_by_slot = None
        self.rows_in_slot_order = False
        every_row = self.rows_on_adapters == len(self.slot_ids)
        self.single_slot = self.active_list[0] if len(self.active_list) == 1 and every_row else None
        self.own_adapters_only = self.shared_slot is None and self.dropout is None
        if self.active_range is not None and self.rows_on_adapters == len(self.active_list):
            rows = (self.slot_ids >= 0).nonzero().squeeze(1)
            self.rows_by_slot = torch.empty_like(rows)
            self.rows_by_slot[self.row_to_active[rows]] = rows
            self.rows_in_slot_order = every_row and bool(
                (self.slot_ids == torch.arange(first, first + len(self.slot_ids), device=self.slot_ids.device)).all()
            )

    def to(self, device: torch.device, non_blocking: bool = False) -> "AdapterRouting":
        """This routing with its tensors on `device`. Built on the host first, a batch's routing
        reads its slots (active_list) without a device sync; `non_blocking` needs pinned tensors."""
        if self.slot_ids.device == device:
            return self
        moved = copy.copy(self)
        for name in ("slot_ids", "task_ids", "active_slots", "row_to_active", "active_mask", "rows_by_slot"):
            value = getattr(self, name)
            if value is not None:
                value = value.pin_memory() if non_blocking else value
                setattr(moved, name, value.to(device, non_blocking=non_blocking))
        return moved

    @classmethod
    def single(cls, slot: int, batch: int) -> "AdapterRouting":
        return cls(torch.full((batch,), slot, dtype=torch.long))
