"""One optimiser step: per-task gradients from one backward, accumulation, per-task isolation."""

import torch

from training.batching import collate
from training.optim import build_optimizer, param_groups
from training.step import token_losses, train_step
from training.surgery import Surgery

from training_toy import mixed_batch, tiny_adapters, toy_examples


def test_per_task_gradients_from_one_backward_equal_separate_backwards(toy_model_dir):
    model, adapters = tiny_adapters(toy_model_dir, num_tasks=3, shared=True, random_b=True)
    adapters.attach_task_grad_sinks()
    batch = mixed_batch(3, rows_per_task=2)
    shared = adapters.slot_parameters(adapters.shared_slot)
    total = batch.num_answer_tokens
    token_losses(model, adapters, batch).sum().div(total).backward()
    binned = adapters.shared_task_grads().clone()  # (T, D)
    summed = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(binned.sum(0), summed, atol=1e-6, rtol=1e-6)

    # Reference: T backward passes, each of one task's loss alone, with no binning.
    for layer in adapters.layers.values():
        layer.task_grads = None
    for task in range(3):
        for p in shared:
            p.grad = None
        losses = token_losses(model, adapters, batch)
        rows = batch.task_ids == task
        (losses[rows].sum() / total).backward()
        separate = torch.cat([p.grad.reshape(-1) for p in shared])
        assert separate.abs().max() > 0
        torch.testing.assert_close(binned[task], separate, atol=1e-6, rtol=1e-6)


def _optimizer(adapters, lr=1e-2):
    return build_optimizer(param_groups(adapters.named_parameters(), lr, 0.01, 2), (0.9, 0.999), 1e-8)


def _flat_params(adapters):
    return torch.cat([p.detach().reshape(-1) for _, p in adapters.named_parameters()])


def test_accumulated_micro_batches_equal_one_big_batch(toy_model_dir):
    rows = [(t, e) for t in range(3) for e in toy_examples(t, 4, seed=1)]
    groups = [rows[0:3], rows[3:5], rows[5:12]]  # uneven sizes: per-batch means would differ
    results = []
    for batches in ([collate(rows, 0)], [collate(g, 0) for g in groups]):
        model, adapters = tiny_adapters(toy_model_dir, num_tasks=3, shared=True, random_b=True)
        adapters.attach_task_grad_sinks()
        optimizer = _optimizer(adapters)
        stats = train_step(model, adapters, optimizer, Surgery("pcgrad", 3, seed=0), batches, 1.0, clip_norm=1.0)
        results.append((stats, _flat_params(adapters)))
    (big, big_params), (acc, acc_params) = results
    assert abs(big.loss - acc.loss) < 1e-6
    assert abs(big.grad_norm - acc.grad_norm) < 1e-6
    # 1e-5: the two runs bucket rows by length differently, so their gradients differ in the last
    # bits, and AdamW's first step (g / |g|) turns that into up to ~lr * 1e-4 on a gradient near 0.
    torch.testing.assert_close(acc_params, big_params, atol=1e-5, rtol=0)


def test_each_task_adapter_moves_only_on_its_own_rows(toy_model_dir):
    model, adapters = tiny_adapters(toy_model_dir, num_tasks=3, shared=True)
    adapters.attach_task_grad_sinks()
    optimizer = _optimizer(adapters)
    before = {s: [p.detach().clone() for p in adapters.slot_parameters(s)] for s in range(4)}
    rows = [(t, e) for t in (0, 2) for e in toy_examples(t, 3, seed=2)]  # no task-1 rows
    train_step(model, adapters, optimizer, Surgery("pcgrad", 3, 0), [collate(rows, 0)], 1.0, None)
    moved = {s: any(not torch.equal(a, b) for a, b in zip(before[s], adapters.slot_parameters(s))) for s in range(4)}
    assert moved == {0: True, 1: False, 2: True, 3: True}  # slot 3 = shared sees every row


def test_loss_goes_down_on_a_learnable_toy_task(toy_model_dir):
    model, adapters = tiny_adapters(toy_model_dir, num_tasks=2, shared=True, r=8)
    adapters.attach_task_grad_sinks()
    optimizer = _optimizer(adapters, lr=2e-2)
    batch = collate([(t, e) for t in range(2) for e in toy_examples(t, 8, seed=3)], 0)
    surgery = Surgery("pcgrad", 2, 0)
    losses = [train_step(model, adapters, optimizer, surgery, [batch], 1.0, 1.0).loss for _ in range(25)]
    assert losses[-1] < 0.1 * losses[0]
