"""What `--model` may name, and turning it into a loaded model: `default` (SmolLM2-135M-Instruct,
fetched into the cache once), a Hugging Face model folder, or a `.gguf` file (converted into the
cache once, keyed by the file's path, size and modification time)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from backbone.default_model import DEFAULT_MODEL_NAME, cache_lock, cache_root, is_converted, pull_default_model
from backbone.errors import ModelLoadError
from backbone.gguf_import import import_gguf
from backbone.loading import load_model
from backbone.model import CausalLM
from backbone.tokenizer import Tokenizer

DEFAULT_SPEC = "default"


def resolve_model(spec: str | Path, progress: bool = True) -> Path:
    """The model folder `spec` names, fetching or converting it first when needed."""
    if str(spec) == DEFAULT_SPEC:
        return pull_default_model(progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_folder(path, progress=progress)
    if path.exists():
        raise ModelLoadError(
            f"model {str(spec)!r} is neither a model folder nor a .gguf file; pass `default`, a Hugging Face "
            "model folder (config.json + model.safetensors) or a .gguf file"
        )
    raise ModelLoadError(
        f"model {str(spec)!r} not found: no such folder or file; pass `default`, a Hugging Face model folder "
        "(config.json + model.safetensors) or a .gguf file"
    )


def converted_gguf_folder(gguf_path: Path, progress: bool = True) -> Path:
    """The cached HF folder converted from `gguf_path`; converted on first use. A changed file
    (other size or modification time) gets a new folder rather than a stale one."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "models" / "gguf" / f"{gguf_path.stem}-{key}"
    if is_converted(folder):
        return folder
    with cache_lock(folder):
        if not is_converted(folder):
            import_gguf(gguf_path, folder, progress=progress)
    return folder


def load_pretrained(
    spec: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = True
) -> tuple[CausalLM, Tokenizer]:
    """The model and its tokenizer, from anything `resolve_model` accepts."""
    folder = resolve_model(spec, progress=progress)
    model = load_model(folder, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelLoadError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} "
            "embeddings; tokenizer.json belongs to another model"
        )
    return model, tokenizer


def served_model_name(spec: str | Path) -> str:
    """The base model's name in the API: `SmolLM2-135M-Instruct` for `default`, else the folder's
    name or the GGUF file's stem."""
    if str(spec) == DEFAULT_SPEC:
        return DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name
