"""The loss computed with the LM head on answer positions only equals the full-logits loss."""

import torch
import torch.nn.functional as F

from training.batching import IGNORE_INDEX
from training.step import token_losses

from training_toy import mixed_batch, tiny_adapters


def _full_logits_losses(model, adapters, batch):
    """The plain definition: logits at every position, cross-entropy with ignored labels."""
    logits = model(batch.input_ids, routing=adapters.routing(batch.task_ids))  # (B, L, V)
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(batch.labels.shape)


def test_answer_only_losses_and_gradients_equal_the_full_logits_path(toy_model_dir):
    model, adapters = tiny_adapters(toy_model_dir, num_tasks=3, shared=True, random_b=True)
    adapters.attach_task_grad_sinks()
    batch = mixed_batch(3, rows_per_task=3)
    assert (batch.labels == IGNORE_INDEX).float().mean() > 0.3  # prompts and padding to skip
    params = [p for _, p in adapters.named_parameters()]
    results = []
    for losses_of in (token_losses, _full_logits_losses):
        adapters.zero_task_grads()
        for p in params:
            p.grad = None
        losses = losses_of(model, adapters, batch)
        (losses.sum() / batch.num_answer_tokens).backward()
        results.append((losses.detach(), [p.grad.clone() for p in params], adapters.shared_task_grads().clone()))
    (fast, fast_grads, fast_bins), (full, full_grads, full_bins) = results
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_bins, full_bins, atol=1e-5, rtol=1e-5)
