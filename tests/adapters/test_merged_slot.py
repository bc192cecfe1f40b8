"""An adapter merged into a copy of the weights against the unmerged model (adapters/merged_slot.py)."""

import pytest
import torch

from adapters.injection import inject_lora
from adapters.lora_layer import LoraLinear
from adapters.merged_slot import SlotMerger
from adapters.routing import AdapterRouting
from backbone import load_model
from backbone.fused_projections import FusedGroup
from backbone.packed_linear import packing_available

RANK = 4
INPUT = torch.tensor([[5, 9, 17, 33], [7, 7, 2, 40], [3, 4, 5, 6]])


def _models(tiny_llama_dir, fused: bool, dtype=torch.float32, slots: int = 3):
    """The model to merge and an unmerged twin with the same weights and adapters. Slot 0's adapter
    leaves k_proj and up_proj alone (rank 0 there), as a q/v-style adapter does."""
    pair = []
    for _ in range(2):
        model = load_model(tiny_llama_dir, dtype=dtype)
        if fused:  # by hand: loading fuses only below fp32
            for layer in model.model.layers:
                attention, mlp = layer.self_attn, layer.mlp
                attention.fused_qkv = FusedGroup([attention.q_proj, attention.k_proj, attention.v_proj])
                mlp.fused_gate_up = FusedGroup([mlp.gate_proj, mlp.up_proj])
        layers = inject_lora(model, model.linear_modules(), num_slots=slots, max_rank=RANK)
        generator = torch.Generator().manual_seed(7)
        for slot in range(slots):
            for name, layer in sorted(layers.items()):
                A = torch.randn(RANK, layer.in_features, generator=generator)
                B = torch.randn(layer.out_features, RANK, generator=generator) * 0.2
                skipped = slot == 0 and name.endswith(("k_proj", "up_proj"))
                layer.set_slot(slot, None if skipped else A, None if skipped else B, 1.5 + slot)
        pair.append((model, layers))
    return pair


def _forward(model, slots, rows=INPUT):
    with torch.inference_mode():
        return model(rows[: len(slots)], routing=AdapterRouting(torch.tensor(slots)))


def _count_adapter_calls(monkeypatch) -> list[int]:
    """Counts calls into the unmerged LoRA path with an adapter to add: a merged batch makes none."""
    calls = [0]
    add_adapters = LoraLinear.add_adapters

    def counting(self, out, x, routing):
        calls[0] += routing is not None and any(self.slot_ranks[slot] for slot in routing.active_list)
        return add_adapters(self, out, x, routing)

    monkeypatch.setattr(LoraLinear, "add_adapters", counting)
    return calls


@pytest.mark.parametrize("fused", [False, True])
def test_merged_batches_equal_the_unmerged_model_and_skip_the_lora_path(tiny_llama_dir, fused, monkeypatch):
    (model, _), (twin, _) = _models(tiny_llama_dir, fused)
    merger = SlotMerger(model, after_batches=2, elements_per_batch=1)  # one unit per batch
    calls = _count_adapter_calls(monkeypatch)
    merged_batches = []
    for _ in range(len(merger.units) + 3):
        routing = AdapterRouting(torch.tensor([0, 0, 0]))
        merger.before_batch(routing)
        calls[0] = 0
        with torch.inference_mode():
            ours = model(INPUT, routing=routing)
        merged_batches.append(calls[0] == 0)
        torch.testing.assert_close(ours, _forward(twin, [0, 0, 0]), atol=1e-5, rtol=1e-5)
    # Nothing for the first batch of the streak, then one unit per batch (and the units slot 0
    # leaves alone never), then every batch merged whole.
    mergeable = [unit for unit in merger.units if any(layer.slot_ranks[0] for layer in unit.layers)]
    assert len(mergeable) == len(merger.units) if fused else len(mergeable) < len(merger.units)  # k_proj, up_proj alone
    assert all(unit.owner.merged is not None for unit in mergeable)
    assert merged_batches == [False] * len(mergeable) + [True] * (len(merger.units) + 3 - len(mergeable))
    assert merger.stats().batches == merged_batches.count(True)
    assert merger.stats().nbytes == sum(unit.owner.weight.numel() * 4 for unit in merger.units)  # all, from the start


def test_mixed_and_base_batches_run_unmerged_beside_a_merged_adapter(tiny_llama_dir, monkeypatch):
    (model, _), (twin, _) = _models(tiny_llama_dir, fused=False)
    merger = SlotMerger(model, after_batches=1)
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))  # slot 1 merged whole
    calls = _count_adapter_calls(monkeypatch)
    for slots in ([1, 2, 1], [1, -1, 1], [2, 2, 2], [0, 0, 0]):
        calls[0] = 0
        ours = _forward(model, slots)
        assert calls[0] > 0  # none of them is all on slot 1
        torch.testing.assert_close(ours, _forward(twin, slots), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(INPUT), twin(INPUT), atol=0, rtol=0)  # the base is untouched


@pytest.mark.parametrize("fused", [False, True])
def test_a_hot_swap_or_a_base_change_is_never_served_from_a_stale_merge(tiny_llama_dir, fused):
    (model, layers), (twin, twin_layers) = _models(tiny_llama_dir, fused)
    merger = SlotMerger(model, after_batches=1)
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))
    generator = torch.Generator().manual_seed(3)
    name = sorted(layers)[5]
    for target in (layers[name], twin_layers[name]):  # a new version of slot 1's adapter, rank 2
        generator.manual_seed(3)
        target.set_slot(1, torch.randn(2, target.in_features, generator=generator),
                        torch.randn(target.out_features, 2, generator=generator), 0.5)
    torch.testing.assert_close(_forward(model, [1, 1, 1]), _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))  # merges the new version again
    torch.testing.assert_close(_forward(model, [1, 1, 1]), _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)
    assert all(not unit.needs_merge(1) for unit in merger.units)
    # A write into the base weight itself (a merge of another adapter into the base, in place).
    for target in (model, twin):
        with torch.no_grad():
            target.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    torch.testing.assert_close(_forward(model, [1, 1, 1]), _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)
    # Buffers replaced by assignment (as `.to()` does).
    for target in (layers[name], twin_layers[name]):
        target.lora_B = target.lora_B * 3
    torch.testing.assert_close(_forward(model, [1, 1, 1]), _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)


def test_merging_waits_for_a_streak_and_moves_to_the_next_adapter_in_the_same_memory(tiny_llama_dir):
    (model, _), (twin, _) = _models(tiny_llama_dir, fused=False)
    merger = SlotMerger(model, after_batches=3)
    for slots in ([1, 1, 1], [1, 1, 1], [1, 2, 1], [1, 1, 1], [1, 1, 1], None, [1, 1, 1], [1, 1, 1]):
        merger.before_batch(AdapterRouting(torch.tensor(slots)) if slots is not None else None)
    assert all(unit.owner.merged is None for unit in merger.units)  # never three in a row
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))
    copies = {id(unit): unit.owner.merged.weight.data_ptr() for unit in merger.units}
    for _ in range(3):
        merger.before_batch(AdapterRouting(torch.tensor([2, 2])))
    assert all(unit.owner.merged.slot == 2 for unit in merger.units)
    assert {id(unit): unit.owner.merged.weight.data_ptr() for unit in merger.units} == copies  # no new memory
    torch.testing.assert_close(_forward(model, [2, 2]), _forward(twin, [2, 2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_forward(model, [1, 1]), _forward(twin, [1, 1]), atol=1e-5, rtol=1e-5)


def test_training_slots_and_shared_adapters_are_never_merged(tiny_llama_dir):
    (model, layers), (twin, _) = _models(tiny_llama_dir, fused=False)
    merger = SlotMerger(model, after_batches=1)
    shared = AdapterRouting(torch.tensor([1, 1, 1]), shared_slot=2)
    merger.before_batch(shared)
    assert all(unit.owner.merged is None for unit in merger.units)
    with torch.inference_mode():
        torch.testing.assert_close(model(INPUT, routing=shared), twin(INPUT, routing=shared), atol=1e-5, rtol=1e-5)
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))
    for layer in layers.values():
        layer.make_trainable(1)
        with torch.no_grad():
            layer.trainable_B["1"].add_(0.5)  # a training step moved it
    routing = AdapterRouting(torch.tensor([1, 1, 1]))
    merger.before_batch(routing)
    with torch.inference_mode():
        ours = model(INPUT, routing=routing)
    for layer in layers.values():
        layer.freeze_trainable()
    # The twin has the trained values in its buffers: ours must have read the parameters, not the merge.
    for name, layer in layers.items():
        twin_layer = dict(twin.named_modules())[name]
        twin_layer.set_slot(1, layer.lora_A[1], layer.lora_B[1], layer.slot_scales[1])
    torch.testing.assert_close(ours, _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packing_available(), reason="bf16 packing needs a CPU with native bf16")
def test_bf16_merges_repack_when_the_copy_is_rewritten(tiny_llama_dir):
    (model, _), (twin, _) = _models(tiny_llama_dir, fused=True, dtype=torch.bfloat16)
    merger = SlotMerger(model, after_batches=1)
    for slot in (1, 2, 1):  # each merge rewrites the same copies in place: a stale packed copy would show
        merger.before_batch(AdapterRouting(torch.tensor([slot] * 3)))
        ours, reference = _forward(model, [slot] * 3).float(), _forward(twin, [slot] * 3).float()
        # One rounding of W + sBA against bf16 products of each: bf16's tolerance, not fp32's.
        torch.testing.assert_close(ours, reference, atol=0.1, rtol=0.05)
        assert (ours - reference).abs().mean() < 0.02


def test_a_failed_merge_leaves_batches_unmerged_and_correct(tiny_llama_dir, monkeypatch):
    (model, _), (twin, _) = _models(tiny_llama_dir, fused=False)
    merger = SlotMerger(model, after_batches=1)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(torch, "addmm", out_of_memory)
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))
    monkeypatch.undo()
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))  # gave up: no more attempts
    assert all(unit.owner.merged is None for unit in merger.units)
    torch.testing.assert_close(_forward(model, [1, 1, 1]), _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)


def test_loading_another_slot_keeps_the_merge_and_a_write_past_set_slot_drops_it(tiny_llama_dir, monkeypatch):
    (model, layers), (twin, twin_layers) = _models(tiny_llama_dir, fused=False)
    merger = SlotMerger(model, after_batches=1)
    merger.before_batch(AdapterRouting(torch.tensor([1, 1, 1])))
    calls = _count_adapter_calls(monkeypatch)
    for target in (layers, twin_layers):  # another adapter comes into slot 2
        for layer in target.values():
            layer.set_slot(2, torch.ones(RANK, layer.in_features), torch.ones(layer.out_features, RANK) * 0.01, 1.0)
    ours = _forward(model, [1, 1, 1])
    assert calls[0] == 0  # still merged: slot 1 did not change
    torch.testing.assert_close(ours, _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)
    assert not any(unit.needs_merge(1) for unit in merger.units)
    name = sorted(layers)[3]
    for target in (layers[name], twin_layers[name]):  # straight into slot 1's stacks, not through set_slot
        with torch.no_grad():
            target.lora_B[1].mul_(-2.0)
    calls[0] = 0
    ours = _forward(model, [1, 1, 1])
    assert calls[0] == 1  # that layer alone runs unmerged
    torch.testing.assert_close(ours, _forward(twin, [1, 1, 1]), atol=1e-5, rtol=1e-5)
