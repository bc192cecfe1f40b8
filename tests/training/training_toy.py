"""Toy multi-task data and a ready tiny model with task adapters, shared by the training tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from adapters.config import LoraConfig
from backbone import load_model
from training.batching import MicroBatch, collate
from training.data import Example
from training.task_adapters import AdapterSource, TaskAdapters


def toy_examples(task: int, count: int, seed: int, prompt_len: int = 4, answer_len: int = 3) -> list[Example]:
    """Learnable: a task-specific answer whose first token also depends on the prompt's last."""
    rng = random.Random(seed * 100 + task)
    examples = []
    for _ in range(count):
        length = prompt_len + rng.randint(0, 3)
        prompt = [rng.randint(10, 60) for _ in range(length)]
        answer = [70 + 10 * task + prompt[-1] % 2] + [71 + 10 * task + k for k in range(answer_len - 1)]
        examples.append(Example(prompt + answer, [False] * length + [True] * answer_len))
    return examples


def mixed_batch(num_tasks: int, rows_per_task: int, seed: int = 0) -> MicroBatch:
    rows = [(t, e) for t in range(num_tasks) for e in toy_examples(t, rows_per_task, seed)]
    random.Random(seed).shuffle(rows)
    return collate(rows, pad_id=0)


def tiny_adapters(
    model_dir: Path, num_tasks: int, shared: bool, r: int = 4, seed: int = 0, random_b: bool = False,
    dtype: torch.dtype = torch.float32,
):  # fmt: skip
    """(model, TaskAdapters) with `num_tasks` task adapters (+ a shared one), trainable; the base in `dtype`."""
    model = load_model(model_dir, dtype=dtype)
    targets = ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    tasks = [AdapterSource(f"task{t}", config) for t in range(num_tasks)]
    shared_source = AdapterSource("shared", LoraConfig(r=r + 2, lora_alpha=r, target_modules=targets)) if shared else None
    adapters = TaskAdapters(model, tasks, shared_source, seed=seed)
    if random_b:  # B = 0 would make every A gradient 0 and the oracles trivial
        generator = torch.Generator().manual_seed(seed + 7)
        for layer in adapters.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
    adapters.make_trainable()
    return model, adapters
