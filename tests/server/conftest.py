"""Fixtures the server tests share: a tiny model with a word-level tokenizer and two random
adapters over it, built once per test module. A module that needs another model or other
adapters defines its own `model_dir` or `adapter_dirs`, which take precedence over these."""

from pathlib import Path

import pytest

from engine_fixtures import save_random_adapter, save_tiny_model_with_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters "a" and "b" (seeds 1 and 2), rank 4 on every linear module."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_random_adapter(root / name, model_dir, seed=seed) for seed, name in enumerate(["a", "b"], 1)}
