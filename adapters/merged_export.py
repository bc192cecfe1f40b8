"""Write a model with an adapter merged in as a plain Hugging Face folder.

For single-adapter deployments elsewhere: the folder (config.json, model.safetensors, the
tokenizer files) loads in transformers or here with no LoRA at all. The folder appears whole or
not at all (temporary sibling + rename).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from backbone.loading import load_model
from backbone.model import CausalLM

from adapters.errors import AdapterError
from adapters.merge import merge_adapter
from adapters.model_spec import resolve_model_folder, served_model_name
from adapters.peft_io import load_adapter

# Files of a model folder that travel unchanged into the merged folder.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def export_merged(model_spec: str, adapter_path: str | Path, out: str | Path, strict_base: bool = False) -> Path:
    """Load the base, merge the adapter, write the merged folder to `out`; returns `out`."""
    folder = resolve_model_folder(model_spec)
    model = load_model(folder)
    weights = load_adapter(
        adapter_path, model.config, strict_base=strict_base, served_model_name=served_model_name(model_spec)
    )
    merge_adapter(model, weights)
    return write_model_folder(model, folder, Path(out))


def write_model_folder(model: CausalLM, source_folder: Path, out: Path) -> Path:
    """The model's current weights plus `source_folder`'s config and tokenizer files, at `out`."""
    if out.exists():
        raise AdapterError(f"output folder {out} already exists; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name in COPIED_FILES:
            if (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, staging / name)
        save_file(_hf_state_dict(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Hugging Face names -> tensors; LoRA slot buffers left out, a tied lm_head stored once."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or ".trainable_" in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = tensor.detach().contiguous().cpu()
    return state
