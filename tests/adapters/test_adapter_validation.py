"""Every way an adapter file can be wrong gives its own error, naming the file and the fix."""

import json
import logging

import pytest
import torch
from adapter_fixtures import our_adapter
from safetensors.torch import load_file, save_file

from adapters.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    CorruptAdapterFileError,
    NonFiniteWeightsError,
    RankTooLargeError,
    ShapeMismatchError,
    UnknownTargetModuleError,
    UnpairedTensorError,
    UnsupportedAdapterError,
)
from adapters.peft_io import load_adapter, save_adapter
from backbone import ModelConfig
from tiny_models import save_tiny_model

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def adapter_dir(tiny_llama_dir, tmp_path):
    return save_adapter(tmp_path / "adapter", our_adapter(tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.fixture
def model_config(tiny_llama_dir):
    return ModelConfig.from_folder(tiny_llama_dir)


def _edit_tensors(folder, edit):
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def test_good_adapter_loads(adapter_dir, model_config):
    weights = load_adapter(adapter_dir, model_config, max_rank=4)
    assert len(weights.tensors) == 4 and weights.max_rank == 4 and weights.warnings == []
    assert weights.nbytes == sum(4 * (a.numel() + b.numel()) for a, b in weights.tensors.values())


def test_missing_folder(tmp_path, model_config):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nowhere", model_config)


@pytest.mark.parametrize("file_name", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file(adapter_dir, model_config, file_name):
    (adapter_dir / file_name).unlink()
    with pytest.raises(AdapterNotFoundError, match=file_name):
        load_adapter(adapter_dir, model_config)


def test_pickle_weights_are_refused_with_the_conversion(adapter_dir, model_config):
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(UnsupportedAdapterError, match="safe_serialization"):
        load_adapter(adapter_dir, model_config)


def test_invalid_json(adapter_dir, model_config):
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        load_adapter(adapter_dir, model_config)


@pytest.mark.parametrize("cut", [0.5, 0.999, 0.0])
def test_truncated_safetensors(adapter_dir, model_config, cut):
    file = adapter_dir / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CorruptAdapterFileError, match="truncated or corrupt"):
        load_adapter(adapter_dir, model_config)


def test_garbage_safetensors(adapter_dir, model_config):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptAdapterFileError, match="adapter_model.safetensors"):
        load_adapter(adapter_dir, model_config)


def test_target_the_base_lacks(adapter_dir, model_config):
    def add_layer_five(tensors):
        tensors[f"{Q0.replace('layers.0', 'layers.5')}.lora_A.weight"] = torch.zeros(4, 64)
        tensors[f"{Q0.replace('layers.0', 'layers.5')}.lora_B.weight"] = torch.zeros(64, 4)

    _edit_tensors(adapter_dir, add_layer_five)
    with pytest.raises(UnknownTargetModuleError, match=r"model\.layers\.5\.self_attn\.q_proj"):
        load_adapter(adapter_dir, model_config)


def test_lm_head_target_is_refused(adapter_dir, model_config):
    _edit_config(adapter_dir, target_modules=["q_proj", "v_proj", "lm_head"])

    def add_head(tensors):
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(128, 4)

    _edit_tensors(adapter_dir, add_head)
    with pytest.raises(UnknownTargetModuleError, match="lm_head"):
        load_adapter(adapter_dir, model_config)


def test_shapes_of_another_base(adapter_dir, tmp_path):
    wider = ModelConfig.from_folder(save_tiny_model(tmp_path / "wide", hidden_size=96))
    with pytest.raises(ShapeMismatchError, match="different base model"):
        load_adapter(adapter_dir, wider)


def test_rank_disagreeing_with_config(adapter_dir, model_config):
    _edit_config(adapter_dir, r=8)
    with pytest.raises(ShapeMismatchError, match="config gives it rank 8"):
        load_adapter(adapter_dir, model_config)


def test_halves_of_different_ranks(adapter_dir, model_config):
    _edit_tensors(adapter_dir, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(64, 3)}))
    with pytest.raises(ShapeMismatchError, match="rank 3"):
        load_adapter(adapter_dir, model_config)


def test_rank_above_max_rank(adapter_dir, model_config):
    with pytest.raises(RankTooLargeError, match="above the maximum rank 2"):
        load_adapter(adapter_dir, model_config, max_rank=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(adapter_dir, model_config, bad):
    def poison(tensors):
        tensors[f"{Q0}.lora_B.weight"][3, 1] = bad

    _edit_tensors(adapter_dir, poison)
    with pytest.raises(NonFiniteWeightsError, match=r"q_proj\.lora_B\.weight"):
        load_adapter(adapter_dir, model_config)


def test_lora_A_without_lora_B(adapter_dir, model_config):
    _edit_tensors(adapter_dir, lambda t: t.pop(f"{Q0}.lora_B.weight"))
    with pytest.raises(UnpairedTensorError, match="lora_A but no lora_B"):
        load_adapter(adapter_dir, model_config)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(peft_type="IA3"), "IA3"),
        (dict(bias="all"), "bias='none'"),
        (dict(init_lora_weights="pissa"), "modified base"),
        (dict(layer_replication=[[0, 2]]), "layer_replication"),
    ],
)
def test_unsupported_features_are_refused(adapter_dir, model_config, changes, message):
    _edit_config(adapter_dir, **changes)
    with pytest.raises(UnsupportedAdapterError, match=message):
        load_adapter(adapter_dir, model_config)


def test_dora_magnitude_tensor_is_refused(adapter_dir, model_config):
    _edit_tensors(adapter_dir, lambda t: t.update({f"{Q0}.lora_magnitude_vector.weight": torch.ones(64)}))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        load_adapter(adapter_dir, model_config)


def test_unknown_config_keys_are_tolerated(adapter_dir, model_config, caplog):
    _edit_config(adapter_dir, some_future_option=3, megatron_config=None)
    with caplog.at_level(logging.DEBUG, logger="adapters.config"):
        load_adapter(adapter_dir, model_config)
    assert "some_future_option" in caplog.text


def test_other_base_model_is_advisory(adapter_dir, model_config):
    _edit_config(adapter_dir, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    weights = load_adapter(adapter_dir, model_config, served_model_name="SmolLM2-135M-Instruct")
    assert len(weights.warnings) == 1 and "meta-llama/Llama-3.2-1B" in weights.warnings[0]
    with pytest.raises(BaseModelMismatchError, match="meta-llama/Llama-3.2-1B"):
        load_adapter(adapter_dir, model_config, strict_base=True, served_model_name="SmolLM2-135M-Instruct")


def test_same_base_by_hub_id_or_folder_is_no_warning(adapter_dir, model_config):
    _edit_config(adapter_dir, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    weights = load_adapter(adapter_dir, model_config, strict_base=True, served_model_name="/cache/SmolLM2-135M-Instruct/")
    assert weights.warnings == []
