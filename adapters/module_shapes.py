"""The base model's LoRA-targetable linear modules and their shapes, from its config alone.

Validating an adapter file needs only the names and (in, out) sizes; computing them from
`ModelConfig` lets the CLI and the server's load path check a file without building the model.
The order is the model's own `named_modules()` order.
"""

from __future__ import annotations

from backbone.config import ModelConfig
from backbone.model import CausalLM


def linear_shapes(model_config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every linear layer but `lm_head`."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    q_width = model_config.num_attention_heads * model_config.head_dim
    kv_width = model_config.num_key_value_heads * model_config.head_dim
    per_layer = {
        "self_attn.q_proj": (hidden, q_width),
        "self_attn.k_proj": (hidden, kv_width),
        "self_attn.v_proj": (hidden, kv_width),
        "self_attn.o_proj": (q_width, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    return {
        f"model.layers.{layer}.{suffix}": shape
        for layer in range(model_config.num_hidden_layers)
        for suffix, shape in per_layer.items()
    }


def model_linear_shapes(model: CausalLM | ModelConfig) -> dict[str, tuple[int, int]]:
    """`linear_shapes` for a config, or the live shapes of a built model."""
    if isinstance(model, ModelConfig):
        return linear_shapes(model)
    return {name: (m.in_features, m.out_features) for name, m in model.linear_modules().items()}
