"""Tiny randomly initialised Hugging Face models, saved as folders, for tests across packages."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def save_tiny_model(folder: Path, architecture: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny `LlamaForCausalLM` / `Qwen2ForCausalLM` (fp32) to `folder`; return it."""
    import transformers

    settings = {**TINY_LLAMA, **overrides}
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).float().eval()
    with torch.no_grad():  # random norms, so a wrong norm cannot hide behind all-ones weights
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def load_reference(folder: Path):
    """The same folder loaded by transformers (the reference), fp32, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
