"""The fast LoRA paths against the plain per-row definition, and mixed batches against single runs."""

import pytest
import torch
from torch import nn

from adapters.injection import inject_lora
from adapters.lora_layer import LoraLinear, reference_lora_forward
from adapters.routing import AdapterRouting
from backbone import load_model


def _layer_with_adapters(ranks=(2, 4, 8), max_rank=8, seed=0) -> LoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(16, 24, bias=True)
    layer = LoraLinear(base, num_slots=len(ranks) + 1, max_rank=max_rank)
    for slot, rank in enumerate(ranks):
        layer.set_slot(slot, torch.randn(rank, 16), torch.randn(24, rank), scale=0.5 + slot)
    return layer


@pytest.mark.parametrize("length", [1, 5])  # 1 = decode path, 5 = prefill path
def test_mixed_rows_match_reference(length):
    layer = _layer_with_adapters()
    x = torch.randn(6, length, 16)
    routing = AdapterRouting(torch.tensor([0, 2, -1, 1, 2, 3]))  # slot 3 is empty
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


def test_shared_slot_adds_to_every_row():
    layer = _layer_with_adapters()
    x = torch.randn(4, 3, 16)
    routing = AdapterRouting(torch.tensor([0, 1, -1, 0]), shared_slot=2)
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


def test_no_routing_is_the_base():
    layer = _layer_with_adapters()
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_mixed_batch_matches_single_adapter_runs(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=3, max_rank=4)
    torch.manual_seed(0)
    for layer in layers.values():
        for slot in range(3):
            layer.set_slot(slot, torch.randn(4, layer.in_features) * 0.1, torch.randn(layer.out_features, 4) * 0.1, 2.0)
    ids = torch.randint(3, 128, (4, 7))
    slots = torch.tensor([2, -1, 0, 1])
    with torch.no_grad():
        mixed = model(ids, routing=AdapterRouting(slots))
        for row, slot in enumerate(slots.tolist()):
            alone = model(ids[row : row + 1], routing=AdapterRouting.single(slot, 1))
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
