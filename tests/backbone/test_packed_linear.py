"""The packed bf16 linear against F.linear: the same bits, and never a stale packed weight."""

import gc

import pytest
import torch
import torch.nn.functional as F

from backbone import load_model
from backbone import packed_linear
from backbone.packed_linear import linear, packing_available

needs_packing = pytest.mark.skipif(not packing_available(), reason="no oneDNN or no native bf16 on this CPU")


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@needs_packing
@pytest.mark.parametrize("rows", [(1,), (16,), (3, 5), (2, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear_bit_for_bit(rows, with_bias):
    # The default model's hidden size: oneDNN blocks the reduction at these sizes, not at toy ones.
    weight, x = _bf16(96, 576, seed=1), _bf16(*rows, 576, seed=2)
    bias = _bf16(96, seed=3) if with_bias else None
    with torch.inference_mode():
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
        strided = _bf16(*rows, 1152, seed=4)[..., ::2]  # a non-contiguous input
        # What its contiguous copy gives. (F.linear itself rounds a strided 3-d product to bf16
        # before adding the bias, where a contiguous one adds it in fp32 as the packed op does.)
        assert torch.equal(linear(strided, weight, bias), F.linear(strided.contiguous(), weight, bias))
    assert id(weight) in packed_linear._packed  # the packed path really ran


@needs_packing
def test_an_in_place_change_of_the_weight_is_seen():
    weight, x = _bf16(64, 32, seed=1), _bf16(4, 32, seed=2)
    with torch.inference_mode():
        before = linear(x, weight)
        weight.mul_(2)  # as an adapter merge does
        assert torch.equal(linear(x, weight), F.linear(x, weight))
        assert not torch.equal(linear(x, weight), before)


@needs_packing
def test_an_in_place_change_through_a_view_is_seen_by_the_fused_weight():
    fused, x = _bf16(96, 32, seed=1), _bf16(4, 32, seed=2)
    k_rows = fused[32:64]  # a fused group's projection weight is a view like this one
    with torch.inference_mode():
        linear(x, fused)
        k_rows.add_(1)
        assert torch.equal(linear(x, fused), F.linear(x, fused))


@needs_packing
def test_a_replaced_data_tensor_is_repacked():
    weight, x = torch.nn.Parameter(_bf16(64, 32, seed=1), requires_grad=False), _bf16(4, 32, seed=2)
    with torch.inference_mode():
        linear(x, weight)
        weight.data = _bf16(64, 32, seed=5)
        assert torch.equal(linear(x, weight), F.linear(x, weight))


@needs_packing
def test_a_freed_weight_drops_its_packed_copy():
    weight, x = _bf16(64, 32, seed=1), _bf16(4, 32, seed=2)
    with torch.inference_mode():
        linear(x, weight)
    key = id(weight)
    assert key in packed_linear._packed
    del weight
    gc.collect()
    assert key not in packed_linear._packed


def test_fp32_and_training_go_through_f_linear():
    weight, x = torch.randn(64, 32), torch.randn(4, 32)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert id(weight) not in packed_linear._packed
    # A bf16 forward that needs a gradient for its input must keep autograd's F.linear.
    weight16, x16 = _bf16(64, 32, seed=1), _bf16(4, 32, seed=2).requires_grad_()
    linear(x16, weight16).sum().backward()
    assert torch.equal(x16.grad, weight16.sum(0).expand(4, 32))
    assert id(weight16) not in packed_linear._packed


@needs_packing
def test_bf16_model_logits_equal_those_without_packing(tiny_llama_dir, monkeypatch):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    input_ids = torch.tensor([[5, 9, 17, 33], [7, 7, 2, 40]])
    with torch.inference_mode():
        packed = model(input_ids)
        monkeypatch.setattr(packed_linear, "_packs", lambda *args: False)
        plain = model(input_ids)
    assert id(model.lm_head.weight) in packed_linear._packed
    assert torch.equal(packed, plain)


@needs_packing
def test_bf16_lora_model_packs_fused_groups_and_lora_bases_with_the_same_logits(tiny_llama_dir, monkeypatch):
    from adapters.injection import inject_lora
    from adapters.routing import AdapterRouting

    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    layers = inject_lora(model, [n for n in model.linear_modules() if "lm_head" not in n], num_slots=2, max_rank=4)
    generator = torch.Generator().manual_seed(0)
    for layer in layers.values():
        for slot in range(2):
            layer.set_slot(slot, torch.randn(4, layer.in_features, generator=generator) * 0.1,
                           torch.randn(layer.out_features, 4, generator=generator) * 0.1, 2.0)
    input_ids = torch.tensor([[5, 9, 17, 33], [7, 7, 2, 40]])
    routing = AdapterRouting(torch.tensor([0, 1]))
    with torch.inference_mode():
        packed = model(input_ids, routing=routing)
        monkeypatch.setattr(packed_linear, "_packs", lambda *args: False)
        plain = model(input_ids, routing=routing)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.fused_qkv is not None and mlp.fused_gate_up is not None  # bf16 fuses them
    for weight in (attention.fused_qkv.weight, mlp.fused_gate_up.weight, attention.o_proj.weight, mlp.down_proj.weight):
        assert id(weight) in packed_linear._packed
    assert torch.equal(packed, plain)
