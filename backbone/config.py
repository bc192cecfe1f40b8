"""The backbone's configuration, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbone.errors import ModelLoadError, UnsupportedArchitectureError

# Architectures whose forward is exactly ours. Mistral's sliding window only matters past
# `sliding_window` tokens, which we refuse to serve (see `max_position_embeddings`).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means grouped-query attention
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear" | "default", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 biases q/k/v only
    o_bias: bool = False  # Llama's `attention_bias` biases o_proj too
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name_or_path: str = ""

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], name_or_path: str = "") -> "ModelConfig":
        architectures = raw.get("architectures") or [_architecture_from_model_type(raw)]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {architecture!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama)"
            )
        if raw.get("use_sliding_window"):
            raise UnsupportedArchitectureError(
                "sliding-window attention (use_sliding_window=true) is not supported; "
                "set it to false or use a model without it"
            )
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            rope = _rope_parameters(raw)
            eos = raw.get("eos_token_id")
            is_qwen = architecture == "Qwen2ForCausalLM"
            attention_bias = bool(raw.get("attention_bias", False))
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.pop("rope_theta", 10000.0)),
                rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=is_qwen or attention_bias,
                o_bias=attention_bias and not is_qwen,
                mlp_bias=bool(raw.get("mlp_bias", False)),
                architecture=architecture,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                name_or_path=name_or_path,
            )
        except KeyError as missing:
            raise ModelLoadError(f"config.json lacks the required key {missing}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: a model folder needs config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path} is not valid JSON: {err}") from None
        return cls.from_hf_dict(raw, name_or_path=str(folder))

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def _architecture_from_model_type(raw: dict[str, Any]) -> str:
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return by_type.get(raw.get("model_type", ""), str(raw.get("model_type") or "unknown"))


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from either layout: transformers<5 (`rope_theta` + `rope_scaling`) or
    transformers>=5 (`rope_parameters` holding both)."""
    params = dict(raw.get("rope_parameters") or {})
    params.update(raw.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    if params["rope_type"] not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"rope scaling {params['rope_type']!r} is not supported; supported: default, linear, llama3"
        )
    return params
