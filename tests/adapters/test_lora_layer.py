"""The fast LoRA paths against the plain per-row definition, and mixed batches against single runs."""

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.parametrize(
    "slot_ids",
    [
        [0, 0, 1, 1, -1, 0, 1, 2],  # rows share adapters unevenly: decode's groups, padded
        [0, 1, 2, -1, 3, 2],  # mostly distinct adapters
        [2, -1, 2, 2],  # one adapter and the base
        [-1, -1],  # nobody on an adapter
    ],
)
@pytest.mark.parametrize("length", [1, 4])
def test_every_path_matches_reference(slot_ids, length):
    layer = _layer_with_adapters()
    x = torch.randn(len(slot_ids), length, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 5])
def test_trained_slot_gradients_match_reference(length):
    """Training goes through the same fast paths; their gradients equal the plain definition's."""
    grads = []
    for forward in (LoraLinear.__call__, reference_lora_forward):
        layer = _layer_with_adapters(seed=3)
        layer.make_trainable(1)
        x = torch.randn(5, length, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
        routing = AdapterRouting(torch.tensor([1, 1, 0, -1, 1]))
        out = forward(layer, x, routing)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((layer.trainable_A["1"].grad, layer.trainable_B["1"].grad, x.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


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


def _three_peft_adapters(model_dir, tmp_path):
    """Adapters of different ranks and target sets, made by PEFT: (name, folder, config)."""
    from adapter_fixtures import peft_adapter

    specs = {
        "attn_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "all_r16": dict(r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True),
        "mlp_r8": dict(r=8, lora_alpha=32, target_modules=["up_proj", "down_proj"], rank_pattern={"down_proj": 2}),
    }
    return {name: (peft_adapter(model_dir, tmp_path / name, seed=i, **spec), tmp_path / name) for i, (name, spec) in enumerate(specs.items())}


def test_mixed_adapters_of_different_ranks_and_targets_match_peft_mixed_batch(tiny_llama_dir, tmp_path):
    """Rows on three different PEFT adapters (and on none) in one batch: equal to PEFT's own
    mixed batch (`adapter_names`) and to each row run alone, in prefill and in cached decode."""
    import peft

    from adapters.peft_io import load_adapter
    from adapters.weights import write_to_slot
    from backbone import KVCache, ModelConfig
    from tiny_models import load_reference

    adapters = _three_peft_adapters(tiny_llama_dir, tmp_path)
    model = load_model(tiny_llama_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=4, max_rank=16)
    names = list(adapters)
    for slot, name in enumerate(names):
        write_to_slot(layers, slot, load_adapter(adapters[name][1], ModelConfig.from_folder(tiny_llama_dir)))

    reference = peft.PeftModel.from_pretrained(load_reference(tiny_llama_dir), adapters[names[0]][1], adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(adapters[name][1], adapter_name=name)
    reference.eval()

    row_adapters = ["all_r16", "__base__", "attn_r4", "mlp_r8", "all_r16", "attn_r4"]
    slots = torch.tensor([names.index(a) if a in names else -1 for a in row_adapters])
    ids = torch.randint(3, 128, (len(row_adapters), 6), generator=torch.Generator().manual_seed(3))
    next_ids = torch.randint(3, 128, (len(row_adapters), 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(torch.cat([ids, next_ids], 1), adapter_names=row_adapters).logits
        cache = KVCache.for_model(model.config, max_rows=len(row_adapters), max_len=16)
        prefill = model(ids, cache=cache, routing=AdapterRouting(slots))
        positions = torch.full((len(row_adapters), 1), ids.shape[1])
        decode = model(next_ids, positions=positions, cache=cache, routing=AdapterRouting(slots))
    torch.testing.assert_close(prefill, expected[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode, expected[:, -1:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for row, slot in enumerate(slots.tolist()):
            alone = model(ids[row : row + 1], routing=AdapterRouting.single(slot, 1))
            torch.testing.assert_close(prefill[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_clearing_a_slot_returns_rows_to_the_base(tiny_llama_dir):
    from adapters.config import LoraConfig
    from adapters.weights import AdapterWeights, clear_slot, write_to_slot

    model = load_model(tiny_llama_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=2, max_rank=8)
    weights = AdapterWeights.initialized(LoraConfig(r=8, init_lora_weights=False, target_modules="all-linear"), model)
    write_to_slot(layers, 1, weights)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        base = model(ids)
        assert not torch.allclose(model(ids, routing=AdapterRouting.single(1, 1)), base)
        clear_slot(layers, 1)
        torch.testing.assert_close(model(ids, routing=AdapterRouting.single(1, 1)), base)


def test_a_narrower_adapter_replaces_a_wider_one_in_a_slot(tiny_llama_dir):
    """Writing an adapter clears the modules it does not target, so nothing of the previous one stays."""
    from adapters.config import LoraConfig
    from adapters.errors import RankTooLargeError
    from adapters.weights import AdapterWeights, write_to_slot

    model = load_model(tiny_llama_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=1, max_rank=8)
    wide = AdapterWeights.initialized(LoraConfig(r=8, init_lora_weights=False, target_modules="all-linear"), model)
    narrow = AdapterWeights.initialized(LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]), model)
    write_to_slot(layers, 0, wide)
    write_to_slot(layers, 0, narrow)
    fresh = load_model(tiny_llama_dir)
    write_to_slot(inject_lora(fresh, fresh.linear_modules(), num_slots=1, max_rank=8), 0, narrow)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, routing=AdapterRouting.single(0, 1)), fresh(ids, routing=AdapterRouting.single(0, 1)))
    too_big = AdapterWeights.initialized(LoraConfig(r=16, target_modules=["q_proj"]), model)
    with pytest.raises(RankTooLargeError, match="maximum 8"):
        write_to_slot(layers, 0, too_big)


@pytest.mark.parametrize("length", [1, 5])
def test_batch_computes_only_up_to_the_largest_rank_in_use(length):
    layer = _layer_with_adapters(ranks=(2, 4, 3), max_rank=32)
    x = torch.randn(5, length, 16)
    for slot_ids in ([0, 0, -1, 2, 2], [0, 1, 2, -1, 1]):
        routing = AdapterRouting(torch.tensor(slot_ids))
        torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)
    assert layer.slot_ranks[:3] == [2, 4, 3]


@pytest.mark.parametrize(
    "slot_ids",
    [
        [2, 0, 1],  # each row its own adapter, consecutive slots, rows out of slot order
        [0, 1, 2, 3],  # the same with rows in slot order: no gather, no scatter (scales differ)
        [1, 2, 3],  # in slot order from slot 1
        [-1, 3, 2, -1, 1],  # the same with rows on the base between them
        [0, 2, -1],  # distinct but not consecutive: the weights gathered
        [1, 1, 2, 3, 3],  # shared adapters in consecutive slots: groups on views of the stacks
    ],
)
def test_decode_paths_over_consecutive_slots_match_reference(slot_ids):
    layer = _layer_with_adapters(ranks=(2, 4, 3, 4), max_rank=8)
    x = torch.randn(len(slot_ids), 1, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


def test_buffers_written_directly_count_as_full_rank():
    layer = LoraLinear(nn.Linear(16, 24), num_slots=2, max_rank=4)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.lora_scale.fill_(1.5)
    x = torch.randn(3, 1, 16)
    routing = AdapterRouting(torch.tensor([0, 1, 1]))
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("slot_ids", [[0, 0, 1, 1], [0, 3, -1, 0, 3, 2], [1, -1]])
def test_slots_that_do_not_target_the_module_add_nothing(slot_ids, length):
    layer = _layer_with_adapters(ranks=(2, 4, 3, 4), max_rank=8)
    for slot in range(4):
        layer.set_slot(slot, None, None, 0.0)  # adapters whose targets skip this module
    x = torch.randn(len(slot_ids), length, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    torch.testing.assert_close(layer(x, routing), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("slot_ids", [[0, 3, -1, 1, 2], [0, 2, -1, 4]])
def test_decode_gather_path_over_scattered_slots_matches_reference(slot_ids):
    layer = _layer_with_adapters(ranks=(2, 4, 3, 4, 1), max_rank=8)
    x = torch.randn(len(slot_ids), 1, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "slot_ids",
    [
        [2, 2, 2],  # every row on one adapter: no mask, the scale as addmm's alpha
        [2, -1, 2],  # one adapter beside rows on the base: one group
        [3, 1, 2, 0],  # each row its own adapter, one scale for all: the scale as index_add's alpha
        [1, -1, 0],  # the same with a row on the base
        [0, 1, 2, 3],  # rows in slot order: the scale as baddbmm's alpha, in place
    ],
)
def test_decode_with_the_scale_folded_into_a_matmul_matches_reference(slot_ids):
    torch.manual_seed(1)
    layer = LoraLinear(nn.Linear(16, 24, bias=True), num_slots=4, max_rank=4)
    for slot, rank in enumerate((2, 4, 3, 4)):
        layer.set_slot(slot, torch.randn(rank, 16), torch.randn(24, rank), scale=2.0)
    x = torch.randn(len(slot_ids), 1, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("slot_ids", "in_order"),
    [([0, 1, 2], True), ([3, 4], True), ([1, 0, 2], False), ([0, 1, -1], False), ([0, 2, 3], False), ([0, 0, 1], False)],
)
def test_routing_knows_when_rows_are_in_slot_order(slot_ids, in_order):
    assert AdapterRouting(torch.tensor(slot_ids)).rows_in_slot_order is in_order


@pytest.mark.parametrize(
    ("slot_ids", "single_slot", "in_order"),
    [([2, 2, 2], 2, False), ([2, -1, 2], None, False), ([0, 1, 2], None, True), ([1], 1, True), ([-1, -1], None, False)],
)
def test_routing_names_the_decode_fast_paths(slot_ids, single_slot, in_order):
    routing = AdapterRouting(torch.tensor(slot_ids))
    assert (routing.single_slot, routing.rows_in_slot_order, routing.own_adapters_only) == (single_slot, in_order, True)
    assert not AdapterRouting(torch.tensor(slot_ids), shared_slot=0).own_adapters_only


@pytest.mark.parametrize("slot_ids", [[1, 1, 1], [0, 1, 2, 3], [1, 2]])  # one adapter; each row its own, in slot order
@pytest.mark.parametrize("max_rank", [4, 8])  # the adapters at the slots' rank, and below it (trimmed views)
@pytest.mark.parametrize("length", [1, 5])  # decode, and a prefill chunk
def test_serving_fast_paths_over_mixed_ranks_match_reference(slot_ids, max_rank, length):
    torch.manual_seed(2)
    layer = LoraLinear(nn.Linear(16, 24, bias=True), num_slots=4, max_rank=max_rank)
    for slot, rank in enumerate((2, 4, 1, 3)):
        layer.set_slot(slot, torch.randn(rank, 16), torch.randn(24, rank), scale=1.5)
    x = torch.randn(len(slot_ids), length, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    expected = reference_lora_forward(layer, x, routing)
    torch.testing.assert_close(layer(x, routing), expected, atol=1e-5, rtol=1e-5)
    # Into a slice of a wider output, as a fused q/k/v or gate/up group hands it over (strided).
    wide = torch.zeros(len(slot_ids), length, 40)
    wide[..., 8:32] = F.linear(x, layer.weight, layer.bias)
    layer.add_adapters(wide.narrow(-1, 8, 24), x, routing)
    torch.testing.assert_close(wide[..., 8:32], expected, atol=1e-5, rtol=1e-5)
    assert not wide[..., :8].any() and not wide[..., 32:].any()


@pytest.mark.parametrize("slot_ids", [[1, 1, 1], [0, 1, 2]])
def test_decode_sees_a_hot_swap_between_steps_of_one_routing(slot_ids):
    """The decode paths keep views of the slot stacks across steps: a slot written in place (a new
    version, of another rank and scale), or stacks replaced outright, must be what the next step reads."""
    torch.manual_seed(3)
    layer = LoraLinear(nn.Linear(16, 24, bias=True), num_slots=3, max_rank=8)
    for slot in range(3):
        layer.set_slot(slot, torch.randn(4, 16), torch.randn(24, 4), scale=2.0)
    x = torch.randn(len(slot_ids), 1, 16)
    routing = AdapterRouting(torch.tensor(slot_ids))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)
        for slot in range(3):  # the same rank and scale: the cached views themselves must see the new weights
            layer.set_slot(slot, torch.randn(4, 16), torch.randn(24, 4), scale=2.0)
        torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)
        layer.set_slot(1, torch.randn(6, 16), torch.randn(24, 6), scale=2.0)  # another rank
        torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)
        layer.lora_B = layer.lora_B.clone() * 3  # replaced, as a `.to()` replaces buffers
        torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)
        layer.set_slot(1, torch.randn(6, 16), torch.randn(24, 6), scale=0.5)  # another scale
        torch.testing.assert_close(layer(x, routing), reference_lora_forward(layer, x, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("slot_ids", "groups", "padded"),
    [
        ([1, 0, 1, -1, 1, 0], [[1, 5, 0], [0, 2, 4]], True),  # slot 0 has 2 rows, slot 1 has 3: one pad
        ([3, 3, 0, 0], [[2, 3], [0, 1]], False),  # even groups: nothing padded
        ([-1, 2, -1], [[1]], False),
    ],
)
def test_routing_groups_decode_rows_by_adapter(slot_ids, groups, padded):
    routing = AdapterRouting(torch.tensor(slot_ids))
    width = len(groups[0])
    assert routing.group_width == width
    assert routing.group_rows.view(-1, width).tolist() == groups
    assert (routing.group_pad is not None) == padded
    if padded:
        assert routing.group_pad.squeeze(-1).tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_bf16_decode_groups_match_the_fp32_reference():
    torch.manual_seed(2)
    layer = LoraLinear(nn.Linear(16, 24, bias=True), num_slots=3, max_rank=4)
    for slot, (rank, scale) in enumerate(((2, 1.0), (4, 2.0), (3, 0.5))):  # scales differ: multiplied in
        layer.set_slot(slot, torch.randn(rank, 16), torch.randn(24, rank), scale=scale)
    x = torch.randn(6, 1, 16)
    routing = AdapterRouting(torch.tensor([1, 0, 1, -1, 1, 2]))
    expected = reference_lora_forward(layer, x, routing)
    layer = layer.to(torch.bfloat16)
    torch.testing.assert_close(layer(x.bfloat16(), routing).float(), expected, atol=0.1, rtol=0.03)
