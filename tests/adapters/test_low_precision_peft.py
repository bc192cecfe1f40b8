"""A PEFT adapter on a bf16 base: our bf16 logits against PEFT's own bf16 run (transformers with
torch_dtype=bfloat16), judged against how far bf16 itself is from fp32."""

import torch
from adapter_fixtures import peft_adapter

from adapters.injection import inject_lora
from adapters.peft_io import load_adapter
from adapters.routing import AdapterRouting
from adapters.weights import write_to_slot
from backbone import ModelConfig, load_model


def test_peft_adapter_in_bf16_matches_peft_in_bf16(tiny_llama_dir, tmp_path):
    import peft
    import transformers

    peft_fp32 = peft_adapter(tiny_llama_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear")
    base_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.bfloat16).eval()
    peft_bf16 = peft.PeftModel.from_pretrained(base_bf16, tmp_path / "adapter").eval()
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(4))

    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    layers = inject_lora(model, model.linear_modules(), num_slots=2, max_rank=8)
    write_to_slot(layers, 1, load_adapter(tmp_path / "adapter", ModelConfig.from_folder(tiny_llama_dir)))
    with torch.no_grad():
        exact = peft_fp32(ids).logits
        reference = peft_bf16(ids).logits.float()
        ours = model(ids, routing=AdapterRouting.single(1, ids.shape[0])).float()
    assert model.lm_head.weight.dtype == torch.bfloat16 and layers["model.layers.0.mlp.up_proj"].lora_A.dtype == torch.bfloat16
    bf16_error = (reference - exact).abs().max().item()  # what bf16 costs PEFT itself
    assert bf16_error > 0  # bf16 really ran
    # bf16 tolerance: our bf16 run is within twice bf16's own error of PEFT's bf16 run, and as close
    # to the exact fp32 logits as PEFT's bf16 run is (up to the same factor).
    assert (ours - reference).abs().max().item() <= 2 * bf16_error
    assert (ours - exact).abs().max().item() <= 2 * bf16_error
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9  # the same next-token choices
