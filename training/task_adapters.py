"""The adapters being trained, laid out in the LoRA layers' slots.

Task t owns slot t; the shared adapter (if any) owns slot T and is added to every row. An adapter
exists only on the modules its `LoraConfig` targets; its rank may be below the layers' `max_rank`,
in which case the padded rows of A / columns of B start at zero and stay there (their gradients
are zero while the other half is zero, and AdamW keeps zeros at zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.binned_grad import TaskGradSink
from adapters.config import LoraConfig, target_module_names
from adapters.injection import inject_lora
from adapters.lora_layer import LoraLinear
from adapters.routing import AdapterRouting, DropoutRates
from adapters.weights import AdapterWeights, initial_lora_weights, read_slot
from backbone.model import CausalLM


class AdapterSetupError(ValueError):
    """Adapter settings that do not fit the model."""


@dataclass
class SlotPlan:
    name: str  # the task's name, or "shared"
    slot: int
    config: LoraConfig
    frozen: bool = False
    modules: list[str] = field(default_factory=list)  # targeted module names, model order
    dropout: float = 0.0  # LoRA dropout while training; a frozen adapter never drops


@dataclass
class AdapterSource:
    """What goes into one slot: a config for a fresh adapter, or weights read from disk (whose
    own config then applies)."""

    name: str
    config: LoraConfig
    initial: AdapterWeights | None = None
    frozen: bool = False


class TaskAdapters:
    """Task slots (and the shared slot) on a model: initialisation, trainable parameters, the
    routing of a batch, the shared adapter's per-task gradients, and the weights to export."""

    def __init__(self, model: CausalLM, tasks: Sequence[AdapterSource], shared: AdapterSource | None, seed: int) -> None:
        self.model = model
        self.num_tasks = len(tasks)
        sources = list(tasks) + ([shared] if shared is not None else [])
        self.shared_slot = self.num_tasks if shared is not None else None
        self.plans: list[SlotPlan] = []
        for slot, source in enumerate(sources):
            config = source.initial.config if source.initial is not None else source.config
            modules = list(source.initial.tensors) if source.initial is not None else target_module_names(config, model)
            if not modules:
                raise AdapterSetupError(
                    f"adapter {source.name!r}: target_modules {config.target_modules!r} match no module of the model; "
                    "use names like q_proj, v_proj, down_proj or 'all-linear'"
                )
            dropout = 0.0 if source.frozen else float(source.config.lora_dropout)
            self.plans.append(SlotPlan(source.name, slot, config, source.frozen, modules, dropout))
        union = [m for m in model.linear_modules() if any(m in plan.modules for plan in self.plans)]
        max_rank = max(plan.config.rank_for(m) for plan in self.plans for m in plan.modules)
        self.layers: dict[str, LoraLinear] = inject_lora(model, union, len(self.plans), max_rank)
        generator = torch.Generator().manual_seed(seed)
        for plan, source in zip(self.plans, sources):
            for module in plan.modules:
                layer = self.layers[module]
                if source.initial is not None:
                    lora_A, lora_B = source.initial.tensors[module]
                else:
                    rank = plan.config.rank_for(module)
                    lora_A, lora_B = initial_lora_weights(plan.config, layer.in_features, layer.out_features, rank, generator)
                layer.set_slot(plan.slot, lora_A, lora_B, plan.config.scale_for(module))

    def plan(self, name: str) -> SlotPlan:
        for plan in self.plans:
            if plan.name == name:
                return plan
        raise KeyError(name)

    # ---- parameters ------------------------------------------------------------------------

    def make_trainable(self) -> None:
        for plan in self.plans:
            if not plan.frozen:
                for module in plan.modules:
                    self.layers[module].make_trainable(plan.slot)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable tensors as `<module>.<adapter>.lora_A|lora_B` (names keep `layers.N.` for
        layer-wise LR)."""
        for plan in self.plans:
            if plan.frozen:
                continue
            for module in plan.modules:
                layer = self.layers[module]
                yield f"{module}.{plan.name}.lora_A", layer.trainable_A[str(plan.slot)]
                yield f"{module}.{plan.name}.lora_B", layer.trainable_B[str(plan.slot)]

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        plan = self.plans[slot]
        if plan.frozen:
            return []
        return [p for m in plan.modules for p in (self.layers[m].trainable_A[str(slot)], self.layers[m].trainable_B[str(slot)])]

    # ---- routing and the shared adapter's per-task gradients -------------------------------

    def routing(self, task_ids: torch.Tensor, slot_spans: list[tuple[int, int, int]] | None = None) -> AdapterRouting:
        """Each row through its own task's slot (slot t = task t), plus the shared slot.
        `slot_spans`: the rows are ordered by task, task t's rows being rows start:stop."""
        return AdapterRouting(
            slot_ids=task_ids, shared_slot=self.shared_slot, task_ids=task_ids, num_tasks=self.num_tasks,
            dropout=self._dropout_rates(task_ids), slot_spans=slot_spans,
        )

    def _dropout_rates(self, task_ids: torch.Tensor) -> DropoutRates | None:
        task_rates = [plan.dropout for plan in self.plans[: self.num_tasks]]
        shared_rate = self.plans[self.shared_slot].dropout if self.shared_slot is not None else 0.0
        if not any(task_rates) and not shared_rate:
            return None
        row_rates = torch.tensor(task_rates, device=task_ids.device)[task_ids] if any(task_rates) else None
        return DropoutRates(row_rates, shared_rate)

    @property
    def trains_shared(self) -> bool:
        return self.shared_slot is not None and not self.plans[self.shared_slot].frozen

    @property
    def bins_task_grads(self) -> bool:
        """Whether the shared layers' backward fills per-task gradient bins (surgery needs them)."""
        return self.trains_shared and any(layer.task_grads is not None for layer in self.layers.values())

    def attach_task_grad_sinks(self) -> None:
        """Give every shared layer per-task gradient bins (filled by its backward)."""
        if not self.trains_shared:
            return
        for module in self.plans[self.shared_slot].modules:
            layer = self.layers[module]
            device = layer.weight.device  # fp32 bins, whatever the model dtype (adapters/binned_grad.py)
            layer.task_grads = TaskGradSink(
                torch.zeros(self.num_tasks, layer.max_rank, layer.in_features, device=device),
                torch.zeros(self.num_tasks, layer.out_features, layer.max_rank, device=device),
            )

    def zero_task_grads(self) -> None:
        for layer in self.layers.values():
            if layer.task_grads is not None:
                layer.task_grads.zero_()

    def shared_task_grads(self) -> torch.Tensor:
        """(T, D): each task's gradient of the shared adapter, all layers concatenated."""
        parts = []
        for module in self.plans[self.shared_slot].modules:
            sink = self.layers[module].task_grads
            parts += [sink.grad_A.reshape(self.num_tasks, -1), sink.grad_B.reshape(self.num_tasks, -1)]
        return torch.cat(parts, dim=1)

    def set_shared_grad(self, flat: torch.Tensor) -> None:
        """Write a flattened (D,) gradient (the surgery's result) into the shared parameters."""
        offset = 0
        for param in self.slot_parameters(self.shared_slot):
            size = param.numel()
            param.grad = flat[offset : offset + size].view_as(param).clone()
            offset += size

    # ---- export -----------------------------------------------------------------------------

    def weights(self, name: str) -> AdapterWeights:
        """The adapter's current weights (detached CPU copies at its own ranks)."""
        plan = self.plan(name)
        return read_slot({m: self.layers[m] for m in plan.modules}, plan.slot, plan.config)

    def update_norm(self, slot: int) -> float:
        """||scale * B A||_F over the adapter's modules (how far it moved the base), via
        ||BA||_F^2 = sum((A A^T) * (B^T B)) so no (out, in) product is formed."""
        plan = self.plans[slot]
        total = 0.0
        with torch.no_grad():
            for module in plan.modules:
                lora_A, lora_B = self.layers[module].slot_weights(plan.slot)
                total += float(((lora_A @ lora_A.T) * (lora_B.T @ lora_B)).sum()) * plan.config.scale_for(module) ** 2
        return math.sqrt(max(total, 0.0))
