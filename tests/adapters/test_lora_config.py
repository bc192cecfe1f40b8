"""LoraConfig means what PEFT's LoraConfig means: target matching, ranks, scales, JSON, init."""

import json
import math

import peft
import pytest
import torch
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from peft.utils.other import get_pattern_key

from adapters.config import LoraConfig, target_module_names
from adapters.errors import AdapterConfigError, UnsupportedAdapterError
from adapters.weights import initial_lora_weights

NAMES = [f"model.layers.{i}.{m}" for i in (0, 1, 11) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
TARGETS = [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj"],
    ["model.layers.1.mlp.down_proj"],
    r".*\.(q|down)_proj",
    r"model\.layers\.1\..*",
    "q_proj",  # a string is a regex over the full name: matches nothing
]


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("layers", [None, [1], 11, []])
def test_target_matching_agrees_with_peft(targets, layers):
    settings = dict(target_modules=targets, layers_to_transform=layers, exclude_modules=["layers.0.self_attn.v_proj"])
    if isinstance(targets, str) and layers is not None:
        with pytest.raises(ValueError):
            peft.LoraConfig(**settings)
        with pytest.raises(AdapterConfigError, match="layers_to_transform"):
            LoraConfig(**settings)
        return
    theirs, ours = peft.LoraConfig(**settings), LoraConfig(**settings)
    for name in NAMES:
        found = check_target_module_exists(theirs, name)
        assert ours.targets(name) == (bool(found) and not isinstance(found, _ExcludedModule)), name


@pytest.mark.parametrize("pattern", [{"q_proj": 3}, {"layers.1.self_attn.q_proj": 3}, {r"layers\.(0|11)\..*": 5}, {"proj": 2}])
def test_rank_and_alpha_patterns_use_peft_keys(pattern):
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern=pattern, alpha_pattern={k: 4 for k in pattern})
    for name in NAMES:
        key = get_pattern_key(pattern.keys(), name)
        assert config.rank_for(name) == pattern.get(key, 8), name
        assert config.scale_for(name) == pytest.approx(pattern.get(key) and 4 / pattern[key] or 16 / 8), name


def test_rslora_scale():
    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert config.scale_for("model.layers.0.self_attn.q_proj") == pytest.approx(8 / math.sqrt(16))


def test_all_linear_is_every_linear_but_lm_head(tiny_llama_dir):
    from backbone import ModelConfig, load_model

    names = target_module_names(LoraConfig(target_modules="all-linear"), ModelConfig.from_folder(tiny_llama_dir))
    assert names == list(load_model(tiny_llama_dir).linear_modules())
    assert len(names) == 14 and "lm_head" not in names


def test_json_round_trip_and_peft_reads_it(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], rank_pattern={"q_proj": 2})
    raw = config.to_dict()
    assert list(raw) == sorted(raw) and raw["peft_type"] == "LORA" and raw["target_modules"] == ["q_proj", "v_proj"]
    assert LoraConfig.from_dict(raw) == LoraConfig.from_dict(json.loads(json.dumps(raw)))
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert (theirs.r, theirs.lora_alpha, sorted(theirs.target_modules), theirs.rank_pattern) == (4, 8, ["q_proj", "v_proj"], {"q_proj": 2})


def test_peft_written_json_reads_here(tmp_path):
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True).save_pretrained(tmp_path)
    ours = LoraConfig.from_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert (ours.r, ours.lora_alpha, ours.target_modules, ours.use_rslora) == (4, 8, ["q_proj"], True)


@pytest.mark.parametrize(
    "values, error, message",
    [
        (dict(r=0), AdapterConfigError, "positive integer"),
        (dict(rank_pattern={"q_proj": -1}), AdapterConfigError, "rank_pattern"),
        (dict(lora_dropout=1.5), AdapterConfigError, "lora_dropout"),
        (dict(bias="lora_only"), UnsupportedAdapterError, "bias"),
        (dict(use_dora=True), UnsupportedAdapterError, "DoRA"),
        (dict(modules_to_save=["score"]), UnsupportedAdapterError, "modules_to_save"),
        (dict(peft_type="PREFIX_TUNING"), UnsupportedAdapterError, "PREFIX_TUNING"),
    ],
)
def test_bad_values_are_refused(values, error, message):
    with pytest.raises(error, match=message):
        LoraConfig(**values)


def test_non_object_json_is_refused():
    with pytest.raises(AdapterConfigError, match="JSON object"):
        LoraConfig.from_dict([1, 2])


def test_init_matches_peft_distributions():
    """Same shapes, zero B, and A's spread as PEFT's init (kaiming-uniform bound 1/sqrt(in); gaussian std 1/r)."""
    generator = torch.Generator().manual_seed(0)
    lora_A, lora_B = initial_lora_weights(LoraConfig(), 400, 300, 8, generator)
    assert lora_A.shape == (8, 400) and lora_B.shape == (300, 8) and not lora_B.any()
    assert lora_A.abs().max() <= 1 / math.sqrt(400) and lora_A.std() == pytest.approx(1 / math.sqrt(3 * 400), rel=0.05)
    lora_A, lora_B = initial_lora_weights(LoraConfig(init_lora_weights="gaussian"), 400, 300, 8, generator)
    assert lora_A.std() == pytest.approx(1 / 8, rel=0.05) and not lora_B.any()
    lora_A, lora_B = initial_lora_weights(LoraConfig(init_lora_weights=False), 400, 300, 8, generator)
    assert lora_B.abs().max() <= 1 / math.sqrt(8) and lora_B.std() > 0.1
