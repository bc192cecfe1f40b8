"""Toy JSONL task files (in the three formats) and configs for end-to-end training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def addition_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        out.append({"instruction": f"what is {a} plus {b}", "output": f"{a + b}"})
    return out


def copy_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        numbers = " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 5)))
        out.append({"prompt": f"copy {numbers}", "completion": f" {numbers}"})
    return out


def chat_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        letter = rng.choice("abcdefgh")
        out.append({"messages": [
            {"role": "user", "content": f"say {letter}"},
            {"role": "assistant", "content": f"{letter} {letter}"},
            {"role": "user", "content": "say hello"},
            {"role": "assistant", "content": "hello"},
        ]})
    return out


def toy_config(root: Path, model_dir: Path, output: str, shared: bool = True, max_steps: int = 6, **overrides) -> dict:
    """A 3-task config (instruction, prompt_completion, chat) over the toy model."""
    data = root / "data"
    write_jsonl(data / "add_train.jsonl", addition_records(24, 0))
    write_jsonl(data / "add_eval.jsonl", addition_records(6, 1))
    write_jsonl(data / "copy_train.jsonl", copy_records(16, 2))
    write_jsonl(data / "chat_train.jsonl", chat_records(12, 3))
    write_jsonl(data / "chat_eval.jsonl", chat_records(4, 4))
    adapter = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}
    config = {
        "model": str(model_dir),
        "output_dir": str(root / output),
        "tasks": [
            {"name": "add", "train": str(data / "add_train.jsonl"), "eval": str(data / "add_eval.jsonl"), "format": "instruction", "adapter": adapter},
            {"name": "copy", "train": str(data / "copy_train.jsonl"), "format": "prompt_completion", "adapter": {**adapter, "r": 2}},
            {"name": "chat", "train": str(data / "chat_train.jsonl"), "eval": str(data / "chat_eval.jsonl"), "format": "chat", "adapter": adapter},
        ],
        "batching": {"batch_tokens": 96, "accumulation": 2},
        "optimizer": {"lr": 0.01, "weight_decay": 0.01, "layer_decay": 0.8},
        "schedule": {"kind": "cosine", "warmup_steps": 2, "max_steps": max_steps, "min_lr_ratio": 0.1},
        "sampling": {"strategy": "temperature", "temperature": 2.0},
        "surgery": {"method": "pcgrad"},
        "eval": {"every": 3},
        "checkpoint": {"every": 3, "keep": 5},
        "progress": False,
        "plots": False,
        "device": "cpu",
        "dtype": "float32",  # the exact path; `loraplex train` would pick auto
        "seed": 0,
    }
    if shared:
        config["shared"] = {"r": 4, "alpha": 4, "targets": ["q_proj", "v_proj", "down_proj"]}
    config.update(overrides)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path
