"""Config validation messages, `train --help`, schedules and AdamW parameter groups."""

import math

import pytest
import torch

from server.cli import build_parser
from training.config import ConfigError, TrainConfig, build, config_reference
from training.optim import build_optimizer, lr_multiplier, param_groups

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


def test_the_fused_optimizer_makes_the_plain_adamw_update():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 16), (16, 4), (8,)]
    named = [(f"model.layers.{i}.w", torch.nn.Parameter(torch.randn(s, generator=generator))) for i, s in enumerate(shapes)]
    plain = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    fused = build_optimizer(param_groups(named, 1e-2, 0.1, 3, layer_decay=0.5), (0.9, 0.99), 1e-8)
    assert fused.param_groups[0]["fused"]
    reference = torch.optim.AdamW(param_groups(plain, 1e-2, 0.1, 3, layer_decay=0.5), betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        for (_, a), (_, b), g in zip(named, plain, grads):
            a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    for (_, a), (_, b) in zip(named, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
