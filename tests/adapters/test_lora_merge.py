"""Merging an adapter equals running it as LoRA; unmerging restores the base; merge is idempotent."""

import pytest
import torch
from adapter_fixtures import our_adapter

from adapters.errors import MergeError, NonFiniteWeightsError
from adapters.injection import inject_lora
from adapters.merge import merge_adapter, merged_adapter, unmerge_adapter
from adapters.merged_export import export_merged
from adapters.peft_io import save_adapter
from adapters.routing import AdapterRouting
from adapters.weights import write_to_slot
from backbone import load_model
from tiny_models import load_reference

IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
CONFIG = dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 4})


def _lora_logits(model_dir, weights):
    model = load_model(model_dir)
    write_to_slot(inject_lora(model, model.linear_modules(), 1, 8), 0, weights)
    with torch.no_grad():
        return model(IDS, routing=AdapterRouting.single(0, 2))


def test_merged_equals_unmerged_and_unmerge_restores(tiny_llama_dir):
    weights = our_adapter(tiny_llama_dir, **CONFIG)
    model = load_model(tiny_llama_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model, weights)
    assert merged_adapter(model) is weights
    with torch.no_grad():
        merged = model(IDS)
    torch.testing.assert_close(merged, _lora_logits(tiny_llama_dir, weights), atol=1e-5, rtol=1e-5)
    assert unmerge_adapter(model) is weights
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, original[name], atol=1e-6, rtol=0)


def test_merge_twice_is_a_no_op(tiny_llama_dir):
    weights = our_adapter(tiny_llama_dir, **CONFIG)
    model = load_model(tiny_llama_dir)
    merge_adapter(model, weights)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model, weights)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, once[name]), name
    unmerge_adapter(model)
    assert unmerge_adapter(model) is None  # nothing merged any more: no second subtraction


def test_merging_a_second_adapter_needs_an_unmerge(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    merge_adapter(model, our_adapter(tiny_llama_dir, seed=1, **CONFIG))
    with pytest.raises(MergeError, match="unmerge it"):
        merge_adapter(model, our_adapter(tiny_llama_dir, seed=2, **CONFIG))


def test_non_finite_merge_names_the_module_and_changes_nothing(tiny_llama_dir):
    weights = our_adapter(tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    weights.tensors["model.layers.1.self_attn.v_proj"][1].fill_(3e38)  # finite, but B @ A overflows
    model = load_model(tiny_llama_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        merge_adapter(model, weights)
    assert merged_adapter(model) is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_merge_works_on_a_model_with_lora_layers(tiny_llama_dir):
    """A LoRA-injected model shares its base weights; merging there changes the bare forward."""
    weights = our_adapter(tiny_llama_dir, **CONFIG)
    model = load_model(tiny_llama_dir)
    inject_lora(model, model.linear_modules(), 1, 8)
    merge_adapter(model, weights)
    with torch.no_grad():
        merged = model(IDS)
    torch.testing.assert_close(merged, _lora_logits(tiny_llama_dir, weights), atol=1e-5, rtol=1e-5)


def test_exported_folder_loads_in_transformers_with_adapter_logits(tiny_llama_dir, tmp_path):
    weights = our_adapter(tiny_llama_dir, **CONFIG)
    save_adapter(tmp_path / "adapter", weights)
    out = export_merged(str(tiny_llama_dir), tmp_path / "adapter", tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    with torch.no_grad():
        theirs = load_reference(out)(IDS).logits
        ours = load_model(out)(IDS)
    expected = _lora_logits(tiny_llama_dir, weights)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_exported_tied_model_keeps_its_tie(tmp_path):
    from tiny_models import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    weights = our_adapter(model_dir, **CONFIG)
    save_adapter(tmp_path / "adapter", weights)
    out = export_merged(str(model_dir), tmp_path / "adapter", tmp_path / "merged")
    with torch.no_grad():
        theirs = load_reference(out)(IDS).logits
    torch.testing.assert_close(theirs, _lora_logits(model_dir, weights), atol=1e-5, rtol=1e-5)
