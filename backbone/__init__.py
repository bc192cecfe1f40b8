"""The frozen base model: a Llama-family forward in plain torch, its weights, tokenizer and cache."""

from backbone.config import SUPPORTED_ARCHITECTURES, ModelConfig
from backbone.errors import ModelLoadError, UnsupportedArchitectureError
from backbone.kv_cache import KVCache
from backbone.loading import load_model
from backbone.model import CausalLM, Projection

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "ModelLoadError",
    "Projection",
    "UnsupportedArchitectureError",
    "load_model",
]
