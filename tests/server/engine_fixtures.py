"""Shared pieces for the engine tests: a tiny model folder with a word-level tokenizer, random
PEFT-format adapters, reproducible prompts, and reference generations with backbone.generate (one
adapter, one slot)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from adapters.config import LoraConfig
from adapters.injection import inject_lora
from adapters.peft_io import load_adapter, save_adapter
from adapters.routing import AdapterRouting
from adapters.weights import AdapterWeights, write_to_slot
from backbone.generate import generate
from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from tiny_models import TINY_LLAMA, save_tiny_model

VOCAB = TINY_LLAMA["vocab_size"]


def save_tiny_model_with_tokenizer(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama whose token i reads as "w<i>" (0 = <pad>, 1 = <s>, 2 = </s>)."""
    save_tiny_model(folder, seed=seed)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<s>", "</s>"])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}))
    return folder


def save_random_adapter(folder: Path, model_dir: Path, seed: int, rank: int = 4, targets="all-linear") -> Path:
    """A PEFT adapter with random non-zero A and B (large enough to change greedy tokens)."""
    model = load_model(model_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    weights = AdapterWeights.initialized(config, model, generator=torch.Generator().manual_seed(seed))
    return save_adapter(folder, weights)


def prompt_tokens(seed: int, length: int) -> list[int]:
    """`length` ordinary tokens (ids 3..122) that differ between seeds from the first one on."""
    return [3 + (seed * 37 + i * 11) % 120 for i in range(length)]


def reference_completion(
    model_dir: Path, adapter_dir: Path | None, prompt: list[int], params: SamplingParams, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Tokens of `prompt` generated alone by backbone.generate, the adapter in a single slot."""
    model = load_model(model_dir, dtype=dtype, device=device)
    routing = None
    if adapter_dir is not None:
        layers = inject_lora(model, model.linear_modules(), num_slots=1, max_rank=8)
        write_to_slot(layers, 0, load_adapter(adapter_dir, model.config))
        routing = AdapterRouting(torch.zeros(1, dtype=torch.long, device=device))
    tokenizer = Tokenizer.from_folder(model_dir)
    return generate(model, [prompt], params, tokenizer=tokenizer, routing=routing)[0].token_ids
