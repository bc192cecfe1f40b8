"""Load a `CausalLM` from a Hugging Face folder (config.json + safetensors, single or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from backbone.config import ModelConfig
from backbone.errors import ModelLoadError
from backbone.fused_projections import fuse_projections
from backbone.model import CausalLM
from backbone.rope import inverse_frequencies


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> CausalLM:
    """Build the model the folder's config describes and fill it with the folder's weights.

    The module is built on the meta device (no storage) and each tensor is read, cast to `dtype`
    on the host and moved to `device` one at a time, then assigned: the device never holds a
    full-precision copy of the model, nor two copies of any tensor."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist; pass a Hugging Face model folder or `default`")
    config = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = CausalLM(config)
    state = read_weights(folder, dtype, device)
    expected = {name for name in model.state_dict() if not (config.tie_word_embeddings and name == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelLoadError(
            f"{folder}: the weights lack {len(missing)} tensor(s) the config requires, first {missing[0]!r}; "
            "the checkpoint is incomplete or belongs to another config"
        )
    for name, param in model.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(param.shape):
            raise ModelLoadError(
                f"{folder}: tensor {name!r} has shape {tuple(state[name].shape)}, the config implies {tuple(param.shape)}"
            )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers made on the meta device hold no data. The RoPE frequencies stay fp32 whatever the
    # model dtype: angles of late positions lose whole radians in bf16 (rope.rotary_cos_sin).
    model.inv_freq = inverse_frequencies(config).to(device)
    model.requires_grad_(False)
    fuse_projections(model)  # below fp32 only, where one matmul per group measured faster
    return model.eval()


def read_weights(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files, converted to `dtype` and placed on `device`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise ModelLoadError(f"{folder} holds no model.safetensors nor model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"shard {file} named by the index is missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    state[name] = handle.get_tensor(name).to(dtype).to(device)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ModelLoadError(f"{file} is truncated or corrupt ({err}); download it again") from None
    return state
