"""Length buckets: the padding-free forward gives the padded batch's losses, gradients and
per-task gradient bins."""

import pytest
import torch

from training.batching import collate
from training.length_buckets import length_buckets, slot_spans
from training.optim import build_optimizer, param_groups
from training.step import token_losses, train_step
from training.surgery import Surgery

from training_toy import tiny_adapters, toy_examples


def test_buckets_hold_every_row_once_with_little_padding_and_rows_ordered_by_task():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 200, (64,), generator=generator).tolist()
    tasks = torch.randint(0, 4, (64,), generator=generator).tolist()
    buckets = length_buckets(lengths, tasks, max_padding=0.05)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(64))
    for bucket in buckets:
        sizes = [lengths[i] for i in bucket]
        assert len(bucket) * max(sizes) - sum(sizes) <= 0.05 * len(bucket) * max(sizes)
        assert [tasks[i] for i in bucket] == sorted(tasks[i] for i in bucket)
        assert slot_spans([tasks[i] for i in bucket]) is not None
    assert len(buckets) < 64  # rows of close lengths do share buckets
    assert length_buckets(lengths, tasks, max_padding=0.0) != [[i] for i in range(64)]


def test_slot_spans_only_when_each_slot_is_one_run():
    assert slot_spans([0, 0, 2, 2, 2, 3]) == [(0, 0, 2), (2, 2, 5), (3, 5, 6)]
    assert slot_spans([0, 1, 0]) is None


def test_bad_padding_share_is_refused():
    with pytest.raises(ValueError, match=r"max_padding must be in \[0, 1\), got 1.5"):
        length_buckets([3, 4], [0, 0], max_padding=1.5)


@pytest.mark.parametrize("max_padding", [0.0, 0.05, 0.5])
def test_bucketed_losses_gradients_and_task_bins_equal_the_padded_batch(toy_model_dir, max_padding):
    model, adapters = tiny_adapters(toy_model_dir, num_tasks=3, shared=True, random_b=True)
    adapters.attach_task_grad_sinks()
    # Uneven lengths (prompts of 2..12 tokens) in a shuffled task order.
    rows = [(t, e) for t in range(3) for e in toy_examples(t, 4, seed=5, prompt_len=2 + 3 * t)]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()]
    batch = collate(rows, pad_id=0)
    assert len(set(batch.lengths.tolist())) > 3
    buckets = length_buckets(batch.lengths.tolist(), batch.task_ids.tolist(), max_padding)
    if max_padding == 0.5:  # buckets of several tasks: the layers' per-adapter slices are exercised
        assert any(len(set(batch.task_ids[bucket].tolist())) > 1 for bucket in buckets)
    params = [p for _, p in adapters.named_parameters()]
    results = []
    for padding in (None, max_padding):
        adapters.zero_task_grads()
        for p in params:
            p.grad = None
        losses = token_losses(model, adapters, batch, max_padding=padding)
        (losses.sum() / batch.num_answer_tokens).backward()
        results.append((losses.detach(), [p.grad.clone() for p in params], adapters.shared_task_grads().clone()))
    (padded, padded_grads, padded_bins), (bucketed, bucketed_grads, bucketed_bins) = results
    assert padded.abs().sum() > 0 and padded_bins.abs().sum() > 0
    torch.testing.assert_close(bucketed, padded, atol=1e-5, rtol=1e-5)
    for a, b in zip(bucketed_grads, padded_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucketed_bins, padded_bins, atol=1e-5, rtol=1e-5)


def test_a_bucketed_training_step_equals_the_padded_one_with_pcgrad_on_the_shared_adapter(toy_model_dir):
    rows = [(t, e) for t in range(3) for e in toy_examples(t, 3, seed=2, prompt_len=2 + 4 * t)]
    batches = [collate(rows[:5], 0), collate(rows[5:], 0)]  # two micro-batches, accumulated
    results = []
    for padding in (None, 0.05):
        model, adapters = tiny_adapters(toy_model_dir, num_tasks=3, shared=True, random_b=True)
        adapters.attach_task_grad_sinks()
        optimizer = build_optimizer(param_groups(adapters.named_parameters(), 1e-3, 0.01, 2), (0.9, 0.999), 1e-8)
        stats = train_step(model, adapters, optimizer, Surgery("pcgrad", 3, seed=0), batches, 1.0, 1.0, max_padding=padding)
        params = torch.cat([p.detach().reshape(-1) for _, p in adapters.named_parameters()])
        results.append((stats, adapters.shared_task_grads().clone(), params))
    (padded, padded_bins, padded_params), (bucketed, bucketed_bins, bucketed_params) = results
    assert bucketed.tokens == padded.tokens and bucketed.task_tokens == padded.task_tokens
    assert bucketed.loss == pytest.approx(padded.loss, abs=1e-5)
    assert bucketed.task_loss == pytest.approx(padded.task_loss, abs=1e-5)
    assert bucketed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)
    torch.testing.assert_close(torch.tensor(bucketed.cosines), torch.tensor(padded.cosines), atol=1e-5, rtol=0)
    torch.testing.assert_close(bucketed_bins, padded_bins, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucketed_params, padded_params, atol=1e-5, rtol=0)
