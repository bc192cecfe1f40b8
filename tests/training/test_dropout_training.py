"""LoRA dropout in training: per-task adapters, the shared adapter and its per-task gradient bins."""

import pytest
import torch

from adapters.config import LoraConfig
from backbone import load_model
from training.batching import collate
from training.config import ConfigError, TrainConfig, build
from training.optim import build_optimizer, param_groups
from training.step import token_losses, train_step
from training.surgery import Surgery
from training.task_adapters import AdapterSource, TaskAdapters

from training_toy import mixed_batch, toy_examples


def _adapters_with_dropout(model_dir, task_rate: float, shared_rate: float, random_b: bool = True):
    model = load_model(model_dir)
    targets = ["q_proj", "v_proj", "down_proj"]
    tasks = [AdapterSource(f"task{t}", LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=task_rate)) for t in range(3)]
    shared = AdapterSource("shared", LoraConfig(r=6, lora_alpha=4, target_modules=targets, lora_dropout=shared_rate))
    adapters = TaskAdapters(model, tasks, shared, seed=0)
    if random_b:  # B = 0 would make every A gradient 0 and the oracle trivial
        generator = torch.Generator().manual_seed(7)
        for layer in adapters.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
    adapters.make_trainable()
    return model, adapters


def test_binned_task_gradients_under_dropout_equal_separate_backwards_with_the_same_masks(toy_model_dir):
    model, adapters = _adapters_with_dropout(toy_model_dir, task_rate=0.2, shared_rate=0.3)
    adapters.attach_task_grad_sinks()
    model.train()
    batch = mixed_batch(3, rows_per_task=2)
    shared = adapters.slot_parameters(adapters.shared_slot)
    total = batch.num_answer_tokens
    torch.manual_seed(11)
    token_losses(model, adapters, batch).sum().div(total).backward()
    binned = adapters.shared_task_grads().clone()
    torch.testing.assert_close(binned.sum(0), torch.cat([p.grad.reshape(-1) for p in shared]), atol=1e-6, rtol=1e-6)

    for layer in adapters.layers.values():
        layer.task_grads = None
    for task in range(3):
        for p in shared:
            p.grad = None
        torch.manual_seed(11)  # the same masks as the binned pass
        losses = token_losses(model, adapters, batch)
        (losses[batch.task_ids == task].sum() / total).backward()
        torch.testing.assert_close(binned[task], torch.cat([p.grad.reshape(-1) for p in shared]), atol=1e-6, rtol=1e-6)

    torch.manual_seed(11)
    other = token_losses(model, adapters, batch)
    model.eval()
    assert not torch.equal(other, token_losses(model, adapters, batch))  # the masks did change the losses


def test_a_step_drops_but_evaluation_and_the_model_outside_the_step_do_not(toy_model_dir):
    model, adapters = _adapters_with_dropout(toy_model_dir, task_rate=0.5, shared_rate=0.5)
    batch = mixed_batch(3, rows_per_task=2)
    optimizer = build_optimizer(param_groups(adapters.named_parameters(), 0.0, 0.0, 2), (0.9, 0.999), 1e-8)
    with torch.no_grad():
        clean = token_losses(model, adapters, batch)  # a freshly loaded model is in eval mode
    stats = train_step(model, adapters, optimizer, Surgery("none", 3, 0), [batch], 1.0, None)  # lr 0: no update
    assert not model.training
    clean_mean = float(clean.sum() / batch.num_answer_tokens)
    assert abs(stats.loss - clean_mean) > 1e-4  # the step's loss saw dropped adapter inputs
    with torch.no_grad():
        assert torch.equal(token_losses(model, adapters, batch), clean)


def test_training_with_dropout_converges_on_the_toy_tasks(toy_model_dir):
    model, adapters = _adapters_with_dropout(toy_model_dir, task_rate=0.1, shared_rate=0.1, random_b=False)
    adapters.attach_task_grad_sinks()
    optimizer = build_optimizer(param_groups(adapters.named_parameters(), 2e-2, 0.01, 2), (0.9, 0.999), 1e-8)
    batch = collate([(t, e) for t in range(3) for e in toy_examples(t, 5, seed=3)], 0)
    surgery = Surgery("pcgrad", 3, 0)
    torch.manual_seed(0)
    losses = [train_step(model, adapters, optimizer, surgery, [batch], 1.0, 1.0).loss for _ in range(20)]
    with torch.no_grad():
        final = float(token_losses(model, adapters, batch).sum() / batch.num_answer_tokens)
    assert final < 0.1 * losses[0]


@pytest.mark.parametrize("where", ["task", "shared"])
def test_dropout_out_of_range_names_the_key(where):
    raw = {"model": "m", "output_dir": "o", "tasks": [{"name": "a", "train": "a.jsonl"}]}
    if where == "task":
        raw["tasks"][0]["adapter"] = {"dropout": 1.0}
        key = r"tasks\[0\].adapter.dropout"
    else:
        raw["shared"] = {"dropout": -0.1}
        key = "shared.dropout"
    with pytest.raises(ConfigError, match=key + r" must be in \[0, 1\)"):
        build(TrainConfig, raw).validate()
