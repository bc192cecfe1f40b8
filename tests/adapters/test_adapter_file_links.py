"""Adapter files are read only as plain files in their folder, never through a symbolic link, so a
file swapped for a link is refused at the read even when the link leads to the very same bytes."""

import os
import shutil

import pytest
from adapter_fixtures import our_adapter

from adapters.errors import LinkedAdapterFileError
from adapters.peft_io import load_adapter, save_adapter
from backbone import ModelConfig


@pytest.fixture
def adapter_dir(tiny_llama_dir, tmp_path):
    weights = our_adapter(tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return save_adapter(tmp_path / "adapter", weights).resolve()


@pytest.fixture
def model_config(tiny_llama_dir):
    return ModelConfig.from_folder(tiny_llama_dir)


@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "adapter_config.json"])
def test_file_replaced_by_a_link_to_the_same_bytes_is_refused(adapter_dir, model_config, tmp_path, file_name):
    registered = load_adapter(adapter_dir, model_config).content_hash
    outside = tmp_path / f"outside-{file_name}"
    shutil.copyfile(adapter_dir / file_name, outside)
    (adapter_dir / file_name).unlink()
    os.symlink(outside, adapter_dir / file_name)
    with pytest.raises(LinkedAdapterFileError, match=f"{file_name} is a symbolic link"):
        load_adapter(adapter_dir, model_config, expected_hash=registered)  # the bytes alone would pass
    with pytest.raises(LinkedAdapterFileError, match="copy the file itself into the folder"):
        load_adapter(adapter_dir, model_config)


def test_registered_folder_replaced_by_a_link_is_refused_on_reread(adapter_dir, model_config, tmp_path):
    registered = load_adapter(adapter_dir, model_config).content_hash
    moved = tmp_path / "moved"
    adapter_dir.rename(moved)
    os.symlink(moved, adapter_dir, target_is_directory=True)
    assert load_adapter(adapter_dir, model_config).content_hash == registered  # a first load may go through a link
    with pytest.raises(LinkedAdapterFileError, match="moved or replaced by a symbolic link since the adapter was registered"):
        load_adapter(adapter_dir, model_config, expected_hash=registered)
