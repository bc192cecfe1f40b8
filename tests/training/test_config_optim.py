"""Config validation messages, `train --help`, schedules and AdamW parameter groups."""

import math

import pytest
import torch

from server.cli import build_parser
from training.config import ConfigError, TrainConfig, build, config_reference
from training.optim import lr_multiplier, param_groups

MINIMAL = {"model": "m", "output_dir": "o", "tasks": [{"name": "a", "train": "a.jsonl"}]}


def test_unknown_and_mistyped_keys_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learning_rate'.*valid keys there: lr"):
        build(TrainConfig, {**MINIMAL, "optimizer": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"tasks\[0\].adapter.r must be int"):
        build(TrainConfig, {**MINIMAL, "tasks": [{"name": "a", "adapter": {"r": "big"}}]})
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        build(TrainConfig, {"model": "m", "tasks": []})
    config = build(TrainConfig, {**MINIMAL, "surgery": {"method": "pcgard"}})
    with pytest.raises(ConfigError, match="surgery.method: 'pcgard' is not one of none, pcgrad, gradvac, cagrad"):
        config.validate()


def test_help_documents_every_field():
    reference = config_reference()
    for key in ("tasks[].adapter.r", "shared.targets", "sampling.cap", "batching.accumulation", "optimizer.layer_decay",
                "schedule.min_lr_ratio", "surgery.method", "eval.patience", "checkpoint.every", "seed", "output_dir"):
        assert f"  {key}:" in reference
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert "sampling.temperature" in train.format_help()


def test_schedules_warm_up_then_decay_to_the_floor():
    assert lr_multiplier(0, 10, 2, "cosine", 0.1) == 0.5
    assert lr_multiplier(1, 10, 2, "cosine", 0.1) == 1.0
    assert lr_multiplier(2, 10, 2, "cosine", 0.1) == 1.0
    assert lr_multiplier(6, 10, 2, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(10, 10, 2, "linear", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "constant", 0.0) == 1.0


def test_layerwise_lr_and_no_decay_on_vectors():
    params = [
        ("model.layers.0.self_attn.q_proj.a.lora_A", torch.nn.Parameter(torch.zeros(2, 2))),
        ("model.layers.2.self_attn.q_proj.a.lora_A", torch.nn.Parameter(torch.zeros(2, 2))),
        ("model.norm.weight", torch.nn.Parameter(torch.zeros(2))),
    ]
    groups = {tuple(g["names"]): g for g in param_groups(params, lr=1.0, weight_decay=0.1, num_layers=3, layer_decay=0.5)}
    assert groups[("model.layers.2.self_attn.q_proj.a.lora_A",)]["lr"] == 1.0
    assert groups[("model.layers.0.self_attn.q_proj.a.lora_A",)]["lr"] == 0.25
    assert groups[("model.norm.weight",)]["weight_decay"] == 0.0


def test_cagrad_c_out_of_range_names_the_key():
    config = build(TrainConfig, {**MINIMAL, "surgery": {"method": "cagrad", "c": 1.0}})
    with pytest.raises(ConfigError, match=r"surgery.c must be in \[0, 1\), got 1.0"):
        config.validate()
