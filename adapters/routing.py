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
    active_list: list[int] = field(init=False)  # active_slots on the host, read once per batch
    # The active slots as a slice when they are consecutive (the slot manager fills slots in
    # order), so layers can take views of their stacks instead of gathering.
    active_range: slice | None = field(init=False)
    # Every row on an adapter of its own, row b on slot active_range.start + b: decode needs
    # neither a gather of the rows' inputs nor a scatter of their deltas (the engine's usual full
    # batch when requests took cache rows and slots in the same order).
    rows_in_slot_order: bool = field(init=False)
    # Decode's rows grouped by adapter, as SGMV groups them: the u-th active adapter's rows are
    # group_rows[u * group_width : (u + 1) * group_width], group_width being the most rows any
    # adapter has, the rest padded with row 0; group_pad (U, group_width, 1) is 1 for a real row
    # and 0 for a pad, None when every adapter has group_width rows (nothing padded).
    group_rows: torch.Tensor = field(init=False)
    group_width: int = field(init=False)
    group_pad: torch.Tensor | None = field(init=False)
    # The one slot of a batch whose rows are all on the same adapter (none on the base), else None:
    # decode's cheapest case, two matmuls on views of that slot.
    single_slot: int | None = field(init=False)
    # Each row adds only its own adapter (no shared slot, no dropout): serving's batches, and the
    # condition for the decode fast paths.
    own_adapters_only: bool = field(init=False)

    def __post_init__(self) -> None:
        self.slot_ids = self.slot_ids.long()
        on_adapter = self.slot_ids >= 0
        used = self.slot_ids[on_adapter]
        self.rows_on_adapters = int(used.numel())
        self.active_slots, inverse = torch.unique(used, return_inverse=True)
        self.row_to_active = torch.full_like(self.slot_ids, -1)
        self.row_to_active[on_adapter] = inverse
        self.active_list = self.active_slots.tolist()
        first = self.active_list[0] if self.active_list else 0
        consecutive = self.active_list == list(range(first, first + len(self.active_list)))
        self.active_range = slice(first, first + len(self.active_list)) if self.active_list and consecutive else None
        every_row = self.rows_on_adapters == len(self.slot_ids)
        self.single_slot = self.active_list[0] if len(self.active_list) == 1 and every_row else None
        self.own_adapters_only = self.shared_slot is None and self.dropout is None
        self.rows_in_slot_order = self.active_range is not None and every_row and bool(
            (self.slot_ids == torch.arange(first, first + len(self.slot_ids), device=self.slot_ids.device)).all()
        )
        self._group_rows(on_adapter.nonzero().squeeze(1), inverse)

    def _group_rows(self, rows: torch.Tensor, inverse: torch.Tensor) -> None:
        adapters = len(self.active_list)
        counts = torch.bincount(inverse, minlength=adapters)
        self.group_width = width = int(counts.max()) if adapters else 0
        order = torch.argsort(inverse, stable=True)  # the adapter rows, adapter by adapter
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(len(order), device=rows.device) - starts[inverse[order]]
        grouped = torch.zeros(adapters, width, dtype=torch.long, device=rows.device)
        grouped[inverse[order], within] = rows[order]
        self.group_rows = grouped.view(-1)
        self.group_pad = None
        if adapters and bool((counts < width).any()):
            self.group_pad = torch.zeros(adapters, width, 1, device=rows.device)
            self.group_pad[inverse[order], within] = 1.0

    def to(self, device: torch.device, non_blocking: bool = False) -> "AdapterRouting":
        """This routing with its tensors on `device`. Built on the host first, a batch's routing
        reads its slots (active_list) without a device sync; `non_blocking` needs pinned tensors."""
        if self.slot_ids.device == device:
            return self
        moved = copy.copy(self)
        for name in ("slot_ids", "task_ids", "active_slots", "row_to_active", "group_rows", "group_pad"):
            value = getattr(self, name)
            if value is not None:
                value = value.pin_memory() if non_blocking else value
                setattr(moved, name, value.to(device, non_blocking=non_blocking))
        return moved

    @classmethod
    def single(cls, slot: int, batch: int) -> "AdapterRouting":
        return cls(torch.full((batch,), slot, dtype=torch.long))
