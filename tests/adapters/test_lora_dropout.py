"""LoRA dropout: the adapter's input only, at each row's rate, in training mode only."""

import torch
import torch.nn.functional as F
from torch import nn

from adapters.lora_layer import LoraLinear
from adapters.routing import AdapterRouting, DropoutRates

WIDTH = 64


def _identity_adapters_layer(num_slots: int = 3) -> LoraLinear:
    """A = B = I at scale 1: the adapter's delta IS its (dropped) input, so masks can be read off."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(WIDTH, WIDTH, bias=True), num_slots=num_slots, max_rank=WIDTH)
    for slot in range(num_slots):
        layer.set_slot(slot, torch.eye(WIDTH), torch.eye(WIDTH), scale=1.0)
    return layer


def _random_layer() -> LoraLinear:
    torch.manual_seed(1)
    layer = LoraLinear(nn.Linear(16, 24), num_slots=3, max_rank=4)
    for slot in range(3):
        layer.set_slot(slot, torch.randn(4, 16), torch.randn(24, 4), scale=0.5)
    return layer


def test_zero_rate_changes_nothing_and_draws_no_random_numbers():
    layer = _random_layer().train()
    x = torch.randn(4, 5, 16)
    plain = AdapterRouting(torch.tensor([0, 1, -1, 0]), shared_slot=2)
    zero = AdapterRouting(torch.tensor([0, 1, -1, 0]), shared_slot=2, dropout=DropoutRates(torch.zeros(4), 0.0))
    state = torch.get_rng_state()
    out = layer(x, zero)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, layer(x, plain))


def test_eval_mode_never_drops():
    layer = _random_layer()
    x = torch.randn(4, 5, 16)
    dropping = AdapterRouting(torch.tensor([0, 1, -1, 0]), shared_slot=2, dropout=DropoutRates(torch.full((4,), 0.5), 0.5))
    plain = AdapterRouting(torch.tensor([0, 1, -1, 0]), shared_slot=2)
    assert torch.equal(layer.eval()(x, dropping), layer(x, plain))
    assert not torch.equal(layer.train()(x, dropping), layer(x, plain))  # the same routing drops in training


def test_training_masks_each_rows_adapter_input_at_its_rate_and_never_the_base():
    layer = _identity_adapters_layer().train()
    rates = torch.tensor([0.1, 0.5, 0.0, 0.3])
    routing = AdapterRouting(torch.tensor([0, 1, -1, 1]), dropout=DropoutRates(rates))
    x = torch.ones(4, 200, WIDTH)
    torch.manual_seed(3)
    delta = layer(x, routing) - F.linear(x, layer.weight, layer.bias)  # (B, T, in): the dropped input
    assert torch.equal(delta[2], torch.zeros_like(delta[2]))  # a row on the base alone: nothing added
    for row in (0, 1, 3):
        p = float(rates[row])
        kept = delta[row].abs() > 0.5
        # Every element is either dropped (exactly the base output) or kept and scaled by 1 / (1 - p).
        torch.testing.assert_close(delta[row][kept], torch.full_like(delta[row][kept], 1 / (1 - p)))
        assert delta[row][~kept].abs().max() < 1e-5
        samples = kept.numel()
        dropped_share = 1 - kept.float().mean().item()
        assert abs(dropped_share - p) < 5 * (p * (1 - p) / samples) ** 0.5  # 5 standard deviations


def test_shared_adapter_draws_its_own_mask_at_its_own_rate():
    layer = _identity_adapters_layer().train()
    routing = AdapterRouting(torch.tensor([-1, 0]), shared_slot=2, dropout=DropoutRates(torch.tensor([0.0, 0.0]), 0.4))
    x = torch.ones(2, 200, WIDTH)
    delta = layer(x, routing) - F.linear(x, layer.weight, layer.bias)
    # Row 0: only the shared adapter; row 1: its own adapter (never dropped at rate 0) plus the shared one.
    shared_only, with_own = delta[0], delta[1] - 1.0
    for values in (shared_only, with_own):
        kept = values.abs() > 0.5
        torch.testing.assert_close(values[kept], torch.full_like(values[kept], 1 / 0.6))
        assert abs((1 - kept.float().mean().item()) - 0.4) < 5 * (0.24 / kept.numel()) ** 0.5
    assert not torch.equal(shared_only, with_own)  # independent draws per row
