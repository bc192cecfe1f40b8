"""Adapters move between PEFT and loraplex with the same logits, both ways (DESIGN decision 3)."""

import pytest
import torch
from adapter_fixtures import our_adapter, peft_adapter
from tiny_models import load_reference

from adapters.injection import inject_lora
from adapters.peft_io import load_adapter, save_adapter
from adapters.routing import AdapterRouting
from adapters.weights import write_to_slot
from backbone import ModelConfig, load_model

CASES = {
    "r4_list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16_all_linear": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
    "rank_alpha_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 8},
        alpha_pattern={"up_proj": 32, r"layers\.0\.self_attn\.v_proj": 3},
    ),
    "regex_targets": dict(r=4, lora_alpha=4, target_modules=r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.up_proj)"),
    "layers_to_transform": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
}


def _our_logits(model_dir, adapter_dir, ids) -> torch.Tensor:
    model = load_model(model_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=2, max_rank=16)
    write_to_slot(layers, 1, load_adapter(adapter_dir, ModelConfig.from_folder(model_dir)))
    with torch.no_grad():
        return model(ids, routing=AdapterRouting.single(1, ids.shape[0]))


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_gives_peft_logits_here(case, tiny_llama_dir, tmp_path):
    peft_model = peft_adapter(tiny_llama_dir, tmp_path / "adapter", **CASES[case])
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(ids).logits
        base = load_reference(tiny_llama_dir)(ids).logits
    ours = _our_logits(tiny_llama_dir, tmp_path / "adapter", ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_adapter_saved_here_gives_same_logits_in_peft(case, tiny_llama_dir, tmp_path):
    import peft

    save_adapter(tmp_path / "adapter", our_adapter(tiny_llama_dir, **CASES[case]))
    peft_model = peft.PeftModel.from_pretrained(load_reference(tiny_llama_dir), tmp_path / "adapter").eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(ids).logits
        base = load_reference(tiny_llama_dir)(ids).logits
    ours = _our_logits(tiny_llama_dir, tmp_path / "adapter", ids)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_targets_match_peft_placement(tiny_llama_dir, tmp_path):
    """The modules PEFT wraps are exactly the ones our config targets, case by case."""
    from adapters.config import LoraConfig, target_module_names

    for case, config in CASES.items():
        peft_model = peft_adapter(tiny_llama_dir, tmp_path / case, **config)
        wrapped = sorted(
            name.removeprefix("base_model.model.")
            for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer")
        )
        ours = sorted(target_module_names(LoraConfig(**config), ModelConfig.from_folder(tiny_llama_dir)))
        assert ours == wrapped, case


def test_fp16_and_bf16_files_load_as_fp32(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    original = load_file(file)
    for dtype in (torch.float16, torch.bfloat16):
        save_file({k: v.to(dtype) for k, v in original.items()}, file)
        weights = load_adapter(tmp_path / "adapter", ModelConfig.from_folder(tiny_llama_dir))
        for module, (lora_A, _) in weights.tensors.items():
            assert lora_A.dtype == torch.float32
            key = f"base_model.model.{module}.lora_A.weight"
            torch.testing.assert_close(lora_A, original[key].to(dtype).float())


def test_named_adapter_keys_load(tiny_llama_dir, tmp_path):
    """Some tools keep PEFT's adapter name in the key: `.lora_A.default.weight`."""
    from safetensors.torch import load_file, save_file

    peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    original = load_file(file)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in original.items()}, file)
    weights = load_adapter(tmp_path / "adapter", ModelConfig.from_folder(tiny_llama_dir))
    assert len(weights.tensors) == 2
    lora_A, _ = weights.tensors["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(lora_A, original["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
