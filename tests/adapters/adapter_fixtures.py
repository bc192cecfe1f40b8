"""Adapters for tests: made by real PEFT on the transformers model, or by us, with non-zero B."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.config import LoraConfig
from adapters.weights import AdapterWeights
from backbone import ModelConfig


def peft_adapter(model_dir: Path, out: Path, seed: int = 0, **config):
    """Create an adapter with `peft.get_peft_model` on the transformers model, give it random
    non-zero B, save it to `out`; returns the PEFT model (the reference for logits)."""
    import peft

    from tiny_models import load_reference

    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(load_reference(model_dir), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def our_adapter(model_dir: Path, seed: int = 0, **config) -> AdapterWeights:
    """An adapter made here (PEFT initialisation, then random B)."""
    generator = torch.Generator().manual_seed(seed)
    weights = AdapterWeights.initialized(LoraConfig(**config), ModelConfig.from_folder(model_dir), generator)
    for lora_A, lora_B in weights.tensors.values():
        lora_B.normal_(0.0, 0.2, generator=generator)
        lora_A.mul_(2.0)  # larger than init so every module's delta is visible in the logits
    return weights
