"""Put LoRA layers on a backbone's linear modules."""

from __future__ import annotations

from collections.abc import Iterable

from backbone.model import CausalLM

from adapters.lora_layer import LoraLinear


def inject_lora(model: CausalLM, module_names: Iterable[str], num_slots: int, max_rank: int) -> dict[str, LoraLinear]:
    """Replace each named linear module with a LoraLinear of `num_slots` slots of rank
    `max_rank` (idempotent: a module already LoRA keeps its slots). Returns name -> layer."""
    linears = model.linear_modules()
    layers: dict[str, LoraLinear] = {}
    for name in module_names:
        if name not in linears:
            raise KeyError(f"the model has no linear module {name!r}")
        module = linears[name]
        if not isinstance(module, LoraLinear):
            parent_name, _, child = name.rpartition(".")
            module = LoraLinear(module, num_slots, max_rank).train(model.training)  # a new module starts in training mode
            setattr(model.get_submodule(parent_name), child, module)
        layers[name] = module
    return layers


def lora_layers(model: CausalLM) -> dict[str, LoraLinear]:
    """The LoRA layers already on the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
