"""Fused q/k/v and gate/up projections against the projections run one by one."""

import pytest
import torch
from torch import nn

from adapters.injection import inject_lora
from adapters.routing import AdapterRouting
from backbone import load_model
from backbone.fused_projections import FusedGroup
from backbone.model import Projection


def _model_pair(tiny_llama_dir):
    """fp32 (exact comparisons), fused by hand: fuse_projections itself fuses only below fp32."""
    fused, apart = load_model(tiny_llama_dir), load_model(tiny_llama_dir)
    for layer in fused.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.fused_qkv = FusedGroup([attention.q_proj, attention.k_proj, attention.v_proj])
        mlp.fused_gate_up = FusedGroup([mlp.gate_proj, mlp.up_proj])
    return fused, apart


def test_low_precision_models_are_fused_and_fp32_models_are_not(tiny_llama_dir):
    assert load_model(tiny_llama_dir, dtype=torch.bfloat16).model.layers[0].self_attn.fused_qkv is not None
    assert load_model(tiny_llama_dir).model.layers[0].self_attn.fused_qkv is None
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    attention = model.model.layers[1].self_attn
    # The projections' weights are views of the fused one: held once, named as in the checkpoint.
    assert attention.k_proj.weight.data_ptr() == attention.fused_qkv.weight[attention.q_proj.out_features :].data_ptr()
    assert "model.layers.1.self_attn.k_proj.weight" in model.state_dict()


@pytest.mark.parametrize("length", [1, 4])  # decode's LoRA paths and prefill's
def test_fused_model_with_mixed_adapters_matches_the_unfused_one(tiny_llama_dir, length):
    fused, apart = _model_pair(tiny_llama_dir)
    generator = torch.Generator()
    for model in (fused, apart):
        layers = inject_lora(model, model.linear_modules(), num_slots=3, max_rank=4)
        generator.manual_seed(0)
        for slot in range(3):
            for layer in layers.values():
                layer.set_slot(slot, torch.randn(4, layer.in_features, generator=generator),
                               torch.randn(layer.out_features, 4, generator=generator) * 0.1, 2.0)
    input_ids = torch.tensor([[5, 9, 17, 33], [7, 7, 2, 40], [3, 4, 5, 6], [9, 9, 9, 9]])[:, :length]
    # Mixed, one shared adapter, each row its own in slot order, and the base.
    for slots in ([0, 1, 2, -1], [1, 1, 1, 1], [0, 1, 2], None):
        routing = AdapterRouting(torch.tensor(slots)) if slots is not None else None
        rows = input_ids[: len(slots)] if slots is not None else input_ids
        with torch.inference_mode():
            torch.testing.assert_close(fused(rows, routing=routing), apart(rows, routing=routing), atol=1e-5, rtol=1e-5)


def test_training_through_a_fused_group_matches_the_unfused_gradients(tiny_llama_dir):
    grads = []
    for model in _model_pair(tiny_llama_dir):
        layers = inject_lora(model, model.linear_modules(), num_slots=2, max_rank=4)
        generator = torch.Generator().manual_seed(1)
        for layer in layers.values():
            layer.set_slot(0, torch.randn(4, layer.in_features, generator=generator),
                           torch.randn(layer.out_features, 4, generator=generator) * 0.1, 2.0)
            layer.make_trainable(0)
        logits = model(torch.tensor([[5, 9, 17, 33], [7, 7, 2, 40]]), routing=AdapterRouting(torch.tensor([0, 0])))
        logits.float().logsumexp(-1).sum().backward()
        grads.append([layers[name].trainable_A["0"].grad for name in sorted(layers)])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_an_in_place_weight_change_is_seen_and_a_replaced_weight_falls_back():
    torch.manual_seed(0)
    projections = [Projection(8, 6, bias=True), Projection(8, 4, bias=True)]
    group = FusedGroup(projections)
    x = torch.randn(3, 8)
    with torch.no_grad():
        projections[1].weight.add_(1.0)  # an adapter merge writes in place
        fused = group.outputs(projections, x, None)
        torch.testing.assert_close(fused[1], nn.functional.linear(x, projections[1].weight, projections[1].bias))
        projections[0].weight = nn.Parameter(torch.zeros(6, 8))  # replaced: the group is no longer intact
        assert not group.intact(projections)
        torch.testing.assert_close(group.outputs(projections, x, None)[0], projections[0].bias.expand(3, 6))
