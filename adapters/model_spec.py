"""What `--model` names for the adapter commands: `default`, a model folder or a .gguf file.

backbone.model_source owns that resolution; this module defers to it, and accepts a plain model
folder on its own so the adapter commands stay usable where that module is absent.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from adapters.errors import AdapterError


def resolve_model_folder(spec: str) -> Path:
    """The Hugging Face folder `spec` names (the default model is fetched on first use)."""
    source = _model_source()
    if source is not None:
        return Path(source.resolve_model(spec))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise AdapterError(
            f"model {spec!r} is not a model folder; pass the path of a Hugging Face model folder (config.json + "
            "model.safetensors)"
        )
    return folder


def served_model_name(spec: str) -> str:
    """The base model's name as the server reports it (compared with an adapter's recorded base)."""
    source = _model_source()
    if source is not None:
        return str(source.served_model_name(spec))
    return Path(spec).expanduser().resolve().name


def _model_source() -> ModuleType | None:
    try:
        return importlib.import_module("backbone.model_source")
    except ModuleNotFoundError as err:
        if err.name != "backbone.model_source":
            raise
        return None
