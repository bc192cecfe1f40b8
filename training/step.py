"""One optimiser step over a list of micro-batches: losses, one backward per micro-batch,
surgery on the shared adapter, clipping, AdamW.

The loss of the accumulated step is sum(token losses) / (answer tokens across ALL its micro-
batches), computed before the first backward: k micro-batches then give exactly the update of one
batch holding all their rows (averaging per-micro-batch means would weight short batches' tokens
more, the bug transformers #34191 fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backbone.model import CausalLM
from training.batching import IGNORE_INDEX, MicroBatch
from training.distributed import Distributed
from training.length_buckets import MAX_PADDING, length_buckets, slot_spans
from training.optim import set_lr
from training.surgery import Surgery, conflict_rate, cosine_matrix
from training.task_adapters import TaskAdapters


@dataclass
class StepStats:
    loss: float  # mean over the step's answer tokens
    task_loss: list[float | None]  # per task mean, None if the task had no rows
    task_tokens: list[int]  # answer tokens per task
    tokens: int  # all tokens processed (padding excluded)
    grad_norm: float  # before clipping
    cosines: list[list[float]] | None  # shared adapter's per-task gradient cosines
    conflict_rate: float | None


def token_losses(
    model: CausalLM, adapters: TaskAdapters, batch: MicroBatch, max_padding: float | None = MAX_PADDING
) -> torch.Tensor:
    """(B, L) cross-entropy of each position's next token, in fp32; 0 where the label is ignored.

    The rows run in length buckets holding at most `max_padding` of padding, each ordered by task
    (training/length_buckets.py); None runs the padded batch as it is, in one forward. The LM
    head runs on the labelled positions only: over a large vocabulary it is a large share of the
    model's FLOPs, and most positions are prompt or padding, whose logits no loss reads."""
    device = model.inv_freq.device
    rows, length = batch.input_ids.shape
    if max_padding is None:
        buckets = [list(range(rows))]
    else:
        buckets = length_buckets(batch.lengths.tolist(), batch.task_ids.tolist(), max_padding)
    hidden_parts, label_parts, flat_parts = [], [], []
    for bucket in buckets:
        index = torch.tensor(bucket)
        bucket_length = int(batch.lengths[index].max())
        input_ids = batch.input_ids[index, :bucket_length].to(device)
        labels = batch.labels[index, :bucket_length]
        task_ids = batch.task_ids[index]
        spans = slot_spans(task_ids.tolist()) if max_padding is not None else None
        positions = torch.arange(bucket_length, device=device).expand(len(bucket), bucket_length)
        routing = adapters.routing(task_ids.to(device), slot_spans=spans)
        hidden = model.hidden_states(input_ids, positions, routing=routing, plain_causal=True)  # (b, l, H)
        labelled = labels != IGNORE_INDEX  # (b, l)
        hidden_parts.append(hidden[labelled.to(device)])
        label_parts.append(labels[labelled])
        flat_parts.append((index[:, None] * length + torch.arange(bucket_length))[labelled])
    # The log-softmax over the vocabulary in fp32: in bf16 its sum of exponentials keeps 8 bits,
    # which is visible in the loss and its gradients (a no-op for an fp32 model).
    logits = model.lm_head(torch.cat(hidden_parts)).float()  # (N, V), N = answer tokens
    losses = torch.zeros(rows * length, device=device, dtype=torch.float32)
    losses[torch.cat(flat_parts).to(device)] = F.cross_entropy(logits, torch.cat(label_parts).to(device), reduction="none")
    return losses.view(rows, length)


def train_step(
    model: CausalLM,
    adapters: TaskAdapters,
    optimizer: torch.optim.Optimizer,
    surgery: Surgery,
    micro_batches: Sequence[MicroBatch],
    lr_multiplier: float,
    clip_norm: float | None,
    scaler: torch.amp.GradScaler | None = None,
    distributed: Distributed | None = None,
    max_padding: float | None = MAX_PADDING,
) -> StepStats:
    """The model is in training mode (LoRA dropout on) inside a step only. With `distributed`,
    `micro_batches` are this rank's share of the step and the result is the global step's.
    `max_padding`: as in `token_losses` (None: each micro-batch in one padded forward)."""
    model.train()
    try:
        return _train_step(
            model, adapters, optimizer, surgery, micro_batches, lr_multiplier, clip_norm, scaler, distributed or Distributed(),
            max_padding,
        )
    finally:
        model.eval()


def _train_step(
    model: CausalLM,
    adapters: TaskAdapters,
    optimizer: torch.optim.Optimizer,
    surgery: Surgery,
    micro_batches: Sequence[MicroBatch],
    lr_multiplier: float,
    clip_norm: float | None,
    scaler: torch.amp.GradScaler | None,
    distributed: Distributed,
    max_padding: float | None,
) -> StepStats:
    """`scaler`: a gradient scaler for an fp16 base, whose activation gradients underflow
    unscaled; the step is skipped (and the scale lowered) when a gradient is not finite."""
    num_tasks = adapters.num_tasks
    device = model.inv_freq.device
    total_tokens = distributed.sum_count(sum(b.num_answer_tokens for b in micro_batches))
    if total_tokens == 0:
        raise ValueError("a training step has no answer tokens; every example lost its answer to truncation")
    optimizer.zero_grad(set_to_none=True)
    adapters.zero_task_grads()
    # Summed on the device and read once at the end: no host sync per micro-batch.
    task_loss_sums = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    task_tokens = torch.zeros(num_tasks, dtype=torch.long)
    tokens = 0
    for batch in micro_batches:
        losses = token_losses(model, adapters, batch, max_padding)  # (B, L)
        loss = losses.sum() / total_tokens
        (scaler.scale(loss) if scaler is not None else loss).backward()
        task_loss_sums.index_add_(0, batch.task_ids.to(device), losses.detach().sum(1).double())
        task_tokens += batch.task_answer_tokens(num_tasks)
        tokens += int(batch.lengths.sum())
    tokens = distributed.sum_step(adapters, task_loss_sums, task_tokens, tokens)  # before surgery
    present = task_tokens > 0

    # A task without rows this step must not move (no weight decay, no stale momentum).
    for task in range(num_tasks):
        if not present[task]:
            for param in adapters.slot_parameters(task):
                param.grad = None

    task_loss_sums = task_loss_sums.cpu()
    if scaler is not None:
        scaler.unscale_(optimizer)  # the parameters' gradients; the bins are unscaled below
    cosines, conflicts = None, None
    if adapters.bins_task_grads:
        task_grads = adapters.shared_task_grads()  # (T, D)
        if scaler is not None:
            task_grads = task_grads / scaler.get_scale()
        matrix = cosine_matrix(task_grads)
        cosines, conflicts = matrix.tolist(), conflict_rate(matrix, present)
        # All T rows, not just the present tasks': a task without rows has a zero gradient, which
        # both methods skip, and GradVac's pairwise targets stay indexed by task id.
        combined = surgery(task_grads)
        adapters.set_shared_grad(combined)

    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    # The norm before clipping; clipping computes it anyway, so it is read from there.
    if not params:
        grad_norm = 0.0
    elif clip_norm is not None and clip_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    set_lr(optimizer, lr_multiplier)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when unscale_ found an inf/nan (the shared bins sum to those grads)
        scaler.update()
    else:
        optimizer.step()
    return StepStats(
        loss=float(task_loss_sums.sum() / total_tokens),
        task_loss=[float(task_loss_sums[t] / task_tokens[t]) if present[t] else None for t in range(num_tasks)],
        task_tokens=task_tokens.tolist(),
        tokens=tokens,
        grad_norm=grad_norm,
        cosines=cosines,
        conflict_rate=conflicts,
    )


@torch.no_grad()
def evaluate_loss(model: CausalLM, adapters: TaskAdapters, batches: Sequence[MicroBatch]) -> tuple[float, int]:
    """Mean answer-token loss over `batches` and the token count."""
    total, count = 0.0, 0
    for batch in batches:
        losses = token_losses(model, adapters, batch)
        total += float(losses.sum())
        count += batch.num_answer_tokens
    return (total / count if count else float("nan")), count
