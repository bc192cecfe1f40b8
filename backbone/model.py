"""A Llama-family causal LM in plain torch: Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama.

Module names follow Hugging Face (`model.layers.3.self_attn.q_proj`), so checkpoints and PEFT
adapter keys map onto this model one to one. Every linear layer is a `Projection`, whose forward
takes the batch's adapter routing as an argument: LoRA layers (adapters/) replace projections and
read the routing; the base ignores it. Routing travels with the call, never as module state, so
two batches in flight never see each other's adapters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbone.config import ModelConfig
from backbone.fused_projections import FusedGroup
from backbone.kv_cache import KVCache
from backbone.logit_refinement import refine_top_logits
from backbone.rope import apply_rotary, inverse_frequencies, rotary_cos_sin

# What a projection receives besides its input: the adapter routing of the batch (defined by the
# adapters package) or None for the bare base model.
Routing = Any


class Projection(nn.Linear):
    """nn.Linear whose forward accepts (and here ignores) the batch's adapter routing."""

    def forward(self, x: torch.Tensor, routing: Routing = None) -> torch.Tensor:  # noqa: ARG002
        return F.linear(x, self.weight, self.bias)

    def add_adapters(self, out: torch.Tensor, x: torch.Tensor, routing: Routing) -> torch.Tensor:  # noqa: ARG002
        """`out` (this projection's base output for `x`) plus its adapters' delta: none here."""
        return out


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype (a bf16 mean of squares loses the small
        # components), as the reference does, then cast back before the weight.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = Projection(config.hidden_size, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Projection(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Projection(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Projection(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        self.fused_qkv: FusedGroup | None = None  # set by fuse_projections (backbone/fused_projections.py)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, T, S) True = may attend; None = plain causal, no cache
        positions: torch.Tensor,  # (B, T)
        cache: KVCache | None,
        cache_rows: torch.Tensor | None,
        routing: Routing,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv.outputs(projections, x, routing)
        else:
            q, k, v = (projection(x, routing) for projection in projections)
        q = q.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v, positions, cache_rows, span=mask.shape[-1])
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and length == 1:
            # Decode: the query heads sharing a kv head become that kv head's query rows
            # (head h = kv_head * groups + g), so attention reads the cache in place instead of
            # copying every key and value `groups` times; the (B, 1, 1, S) mask broadcasts.
            grouped_q = q.reshape(batch, self.num_kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask)  # (B, kv_heads, groups, hd)
            out = out.reshape(batch, self.num_heads, 1, self.head_dim)
        else:
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            # is_causal lets SDPA pick its fused causal kernel (training's common case). In bf16/fp16
            # SDPA's kernels accumulate the softmax in fp32, so no upcast of q/k/v is needed here.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, heads, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1), routing)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Projection(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = Projection(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Projection(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.fused_gate_up: FusedGroup | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up.outputs((self.gate_proj, self.up_proj), x, routing)
        else:
            gate, up = self.gate_proj(x, routing), self.up_proj(x, routing)
        return self.down_proj(F.silu(gate) * up, routing)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: KVCache | None,
        cache_rows: torch.Tensor | None,
        routing: Routing,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, cache, cache_rows, routing)
        return x + self.mlp(self.post_attention_layernorm(x), routing)


class DecoderStack(nn.Module):
    """The `model.` part of a Hugging Face causal LM: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = Projection(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        positions: torch.Tensor | None = None,  # (B, T) absolute positions; default 0..T-1
        cache: KVCache | None = None,
        cache_rows: torch.Tensor | None = None,  # (B,) the cache row of each batch row; None = 0..B-1
        routing: Routing = None,
        logits_for: str = "all",  # "all" (B, T, V) | "last" (B, 1, V): the decode step needs only the last
        last_index: torch.Tensor | None = None,  # (B,) with logits_for="last": each row's last real token
        key_span: int | None = None,  # with a cache: max(positions) + 1 if the caller knows it (no device sync)
    ) -> torch.Tensor:
        batch, length = input_ids.shape
        plain_causal = positions is None and cache is None  # positions 0..T-1 in every row
        if positions is None:
            positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        hidden = self.hidden_states(input_ids, positions, cache, cache_rows, routing, plain_causal, key_span)
        if logits_for == "last":
            index = torch.full((batch,), length - 1, device=hidden.device) if last_index is None else last_index
            hidden = hidden[torch.arange(batch, device=hidden.device), index][:, None]
        logits = self.lm_head(hidden, routing)
        if logits_for == "last" and logits.dtype != torch.float32:
            # Next-token logits of a bf16/fp16 model: the top candidates in fp32, so greedy picks
            # the model's argmax rather than the output rounding's (backbone/logit_refinement.py).
            return refine_top_logits(logits, hidden, self.lm_head.weight, self.lm_head.bias)
        return logits

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        cache_rows: torch.Tensor | None = None,
        routing: Routing = None,
        plain_causal: bool = False,
        key_span: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden). `plain_causal`: positions are 0..T-1 in every
        row and there is no cache, so attention needs no mask of ours."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.inv_freq)
        # Computed in fp32, cast once here rather than in each layer (apply_rotary's cast is then free).
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = None if plain_causal else attention_mask(positions, with_cache=cache is not None, span=key_span)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, positions, cache, cache_rows, routing)
        return self.model.norm(x)

    def linear_modules(self) -> dict[str, nn.Module]:
        """Every projection by its Hugging Face name except `lm_head` (the LoRA targets)."""
        return {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head"
        }


def attention_mask(positions: torch.Tensor, with_cache: bool, span: int | None = None) -> torch.Tensor:
    """(B, 1, T, S) boolean mask: a query at position p sees keys at positions <= p.

    With a cache the keys are the cache indices 0..S-1 (index = position); without one they are
    this call's own tokens at `positions`. `span` = S when the caller knows it: reading it off a
    GPU tensor would cost a host sync per forward."""
    if with_cache:
        span = int(positions.max()) + 1 if span is None else span
        key_positions = torch.arange(span, device=positions.device)[None, :]  # (1, S)
    else:
        key_positions = positions  # (B, T)
    return (key_positions[:, None, None, :] <= positions[:, None, :, None])
