"""`AdapterWeights`: one adapter's parsed CPU tensors, and placing it into LoRA-layer slots.

This is the CPU tier of DESIGN decision 6: the store holds files, `AdapterWeights` holds fp32
tensors ready to copy, the slots hold what the forward reads. Adapters with different target sets
share one model: a slot's modules the adapter does not target are cleared to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from backbone.config import ModelConfig
from backbone.model import CausalLM

from adapters.config import LoraConfig, target_module_names
from adapters.errors import RankTooLargeError, SlotLayoutError
from adapters.lora_layer import LoraLinear
from adapters.module_shapes import model_linear_shapes


@dataclass
class AdapterWeights:
    config: LoraConfig
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))
    warnings: list[str] = field(default_factory=list)  # advisory findings, e.g. another base model
    source: str = ""  # where it was read from, for messages
    content_hash: str = ""  # sha256 of the files it was read from ("" = not read from files)

    def scale(self, module_name: str) -> float:
        return self.config.scale_for(module_name)

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.tensors.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.tensors.values())

    def delta(self, module_name: str) -> torch.Tensor:
        """scale * B @ A (out, in) in fp32: what the adapter adds to the module's weight."""
        lora_A, lora_B = self.tensors[module_name]
        return (lora_B.float() @ lora_A.float()) * self.scale(module_name)

    @classmethod
    def initialized(
        cls, config: LoraConfig, model: CausalLM | ModelConfig, generator: torch.Generator | None = None
    ) -> "AdapterWeights":
        """A new adapter initialised as PEFT does for `config.init_lora_weights`."""
        shapes = model_linear_shapes(model)
        tensors = {}
        for name in target_module_names(config, model):
            in_features, out_features = shapes[name]
            tensors[name] = initial_lora_weights(config, in_features, out_features, config.rank_for(name), generator)
        return cls(config, tensors)


def initial_lora_weights(
    config: LoraConfig, in_features: int, out_features: int, rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) as PEFT's `reset_lora_parameters` makes them."""
    lora_A = _linear_default_init(torch.empty(rank, in_features), generator)
    lora_B = torch.zeros(out_features, rank)
    init = config.init_lora_weights
    if init is False:
        _linear_default_init(lora_B, generator)  # PEFT leaves nn.Linear's own init on both
    elif isinstance(init, str) and init.lower() == "gaussian":
        lora_A.normal_(0.0, 1.0 / rank, generator=generator)
    return lora_A, lora_B


def _linear_default_init(weight: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), written out for the generator.
    bound = 1.0 / math.sqrt(weight.shape[1])
    return weight.uniform_(-bound, bound, generator=generator)


def write_to_slot(layers: dict[str, LoraLinear], slot: int, weights: AdapterWeights, non_blocking: bool = False) -> None:
    """Place `weights` in `slot` of every layer; layers it does not target get an empty slot.
    `non_blocking`: queue the copies (pinned host tensors onto a CUDA device)."""
    missing = sorted(set(weights.tensors) - set(layers))
    if missing:
        raise SlotLayoutError(
            f"adapter {weights.source or '(in memory)'} targets {missing[0]!r}, which has no LoRA layer on this "
            f"model ({len(missing)} such module(s)); inject LoRA on every module adapters may target "
            "(e.g. all linear modules)"
        )
    for name, (lora_A, _) in weights.tensors.items():
        if lora_A.shape[0] > layers[name].max_rank:
            raise RankTooLargeError(
                f"adapter {weights.source or '(in memory)'} has rank {lora_A.shape[0]} on {name!r}, above the "
                f"slots' maximum {layers[name].max_rank}; raise the maximum rank or use a lower-rank adapter"
            )
    # Checked in full above, so a refused adapter leaves the slot as it was.
    for name, layer in layers.items():
        if name in weights.tensors:
            lora_A, lora_B = weights.tensors[name]
            layer.set_slot(slot, lora_A, lora_B, weights.scale(name), non_blocking)
        else:
            layer.set_slot(slot, None, None, 0.0)


def clear_slot(layers: dict[str, LoraLinear], slot: int) -> None:
    for layer in layers.values():
        layer.set_slot(slot, None, None, 0.0)


def read_slot(layers: dict[str, LoraLinear], slot: int, config: LoraConfig) -> AdapterWeights:
    """The adapter in `slot` (trained values included) as AdapterWeights with `config`'s ranks:
    how training turns a slot back into a PEFT artifact."""
    tensors = {}
    for name, layer in layers.items():
        if not config.targets(name):
            continue
        rank = config.rank_for(name)
        lora_A, lora_B = layer.slot_weights(slot)
        tensors[name] = (lora_A[:rank].detach().float().cpu().clone(), lora_B[:, :rank].detach().float().cpu().clone())
    return AdapterWeights(config, tensors)
