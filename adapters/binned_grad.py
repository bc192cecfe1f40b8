"""The shared adapter's delta with a backward that also bins weight gradients by task.

Rows of a batch are independent, so d(loss_t)/dA is the sum of the per-row contributions of task
t's rows. Splitting the ordinary weight-gradient matmuls by task gives all T per-task gradients for
the cost of one backward pass; their sum is the ordinary gradient, which autograd receives as
usual. The per-task parts are added into `sink` (accumulating across micro-batches).

Precision: the forward runs in the activations' dtype (A and B cast at use); the per-task weight
gradients are computed and binned in fp32 whatever that dtype is, because surgery compares and
projects them (cosines of bf16 gradients are too coarse), and they are returned in the
parameters' own dtype (fp32 when trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskGradSink:
    """Per-task gradients of one layer's shared A (T, r, in) and B (T, out, r)."""

    grad_A: torch.Tensor
    grad_B: torch.Tensor

    def zero_(self) -> None:
        self.grad_A.zero_()
        self.grad_B.zero_()


class _BinnedSharedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale, task_ids, sink, token_spans):  # x (N, in), A (r, in), B (out, r)
        hidden = x @ lora_A.to(x.dtype).T  # (N, r)
        ctx.save_for_backward(x, lora_A, lora_B, hidden, task_ids)
        ctx.scale, ctx.sink, ctx.token_spans = scale, sink, token_spans
        return (hidden @ lora_B.to(x.dtype).T) * scale  # (N, out)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, hidden, task_ids = ctx.saved_tensors
        grad_out = grad_out * ctx.scale
        grad_hidden = grad_out @ lora_B.to(grad_out.dtype)  # (N, r)
        # fp32 for the bins (a no-op for an fp32 model).
        x32, hidden32, grad_out32, grad_hidden32 = x.float(), hidden.float(), grad_out.float(), grad_hidden.float()
        grad_A = torch.zeros(lora_A.shape, dtype=torch.float32, device=lora_A.device)
        grad_B = torch.zeros(lora_B.shape, dtype=torch.float32, device=lora_B.device)
        if ctx.token_spans is not None:  # each task's tokens are one slice: views, no gathers
            parts = [(task, slice(start, stop)) for task, start, stop in ctx.token_spans]
        else:
            parts = [(task, (task_ids == task).nonzero().squeeze(1)) for task in range(ctx.sink.grad_A.shape[0])]
        for task, rows in parts:
            if isinstance(rows, torch.Tensor) and rows.numel() == 0:  # spans are never empty
                continue
            task_grad_A = grad_hidden32[rows].T @ x32[rows]  # (r, in)
            task_grad_B = grad_out32[rows].T @ hidden32[rows]  # (out, r)
            ctx.sink.grad_A[task] += task_grad_A
            ctx.sink.grad_B[task] += task_grad_B
            grad_A += task_grad_A
            grad_B += task_grad_B
        return grad_hidden @ lora_A.to(grad_hidden.dtype), grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype), None, None, None, None


def binned_shared_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    task_ids: torch.Tensor,
    sink: TaskGradSink,
    task_spans: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """(B, T, in) -> (B, T, out) shared-adapter delta; `task_ids` is per batch row. `task_spans`:
    (task, start, stop) when the rows are ordered by task, task t's rows being start:stop."""
    batch, length, width = x.shape
    token_tasks = task_ids[:, None].expand(batch, length).reshape(-1)
    token_spans = None if task_spans is None else [(task, start * length, stop * length) for task, start, stop in task_spans]
    out = _BinnedSharedDelta.apply(x.reshape(-1, width), lora_A, lora_B, scale, token_tasks, sink, token_spans)
    return out.view(batch, length, -1)
