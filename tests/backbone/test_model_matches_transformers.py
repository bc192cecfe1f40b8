"""Our forward against transformers' on the same weights: the oracle for the backbone."""

import pytest
import torch

from backbone import load_model
from tiny_models import load_reference, save_tiny_model

CASES = {
    "llama_gqa_untied": dict(architecture="llama"),
    "llama_tied": dict(architecture="llama", tie_word_embeddings=True),
    "llama_mha_attention_bias": dict(architecture="llama", num_key_value_heads=4, attention_bias=True),
    "llama_rope_linear": dict(architecture="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama_rope_llama3": dict(
        architecture="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2_qkv_bias": dict(architecture="qwen2"),
    "qwen2_tied": dict(architecture="qwen2", tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    folder = save_tiny_model(tmp_path, **CASES[case])
    ours, reference = load_model(folder), load_reference(folder)
    input_ids = torch.randint(3, 128, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = ours(input_ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
