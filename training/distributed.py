"""Data-parallel training over processes started by torchrun (DESIGN decision 7).

Every rank plans the same global step (the planner and the task sampler are seeded alike), takes
its share of that step's rows, and runs forward and backward on them. Before surgery the ranks sum,
in one all-reduce, every adapter gradient and the shared adapter's per-task gradient bins (surgery
on local gradients would be another algorithm), then the step's loss sums and token counts. The
loss is normalised by the answer tokens of the GLOBAL step, so N processes apply exactly the update
one process would on the same rows; the optimiser and surgery then run identically on every rank
and the adapters stay equal without broadcasts. Rank 0 alone writes logs, checkpoints and exports.
The planner's state is global, so a run resumes under any world size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.batching import pack_by_length
from training.task_adapters import TaskAdapters

log = logging.getLogger(__name__)

Row = tuple[int, int]  # (sampler task index, example index)


class DistributedError(ValueError):
    """A distributed run that cannot work as configured."""


@dataclass
class Distributed:
    """This process's place in the job; world_size 1 is a plain single-process run."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: torch.device | str = "cpu") -> "Distributed":
        """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT); gloo on
        CPU, NCCL on CUDA. Without torchrun's variables: one process, no group."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_available():
            raise DistributedError("this torch build has no torch.distributed; run `loraplex train` without torchrun")
        if not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        context = cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        log.info("rank %d of %d (%s)", context.rank, context.world_size, dist.get_backend())
        return context

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- the step's rows ----------------------------------------------------------------------

    def share_of_step(self, plan: Sequence[Sequence[Row]], lengths: Sequence[Sequence[int]], batch_tokens: int) -> list[list[Row]]:
        """This rank's rows of the global step, grouped into micro-batches by length. Rows are
        dealt in turn from the length-sorted plan, so every rank gets similar lengths and tasks."""
        rows = [row for group in plan for row in group]
        if not self.active:
            return [list(group) for group in plan]
        if len(rows) < self.world_size:
            raise DistributedError(
                f"this step has {len(rows)} rows for {self.world_size} processes; raise batching.batch_tokens or "
                "batching.accumulation (the global step is shared by all processes), or start fewer processes"
            )
        mine = rows[self.rank :: self.world_size]
        groups = pack_by_length([lengths[task][index] for task, index in mine], batch_tokens)
        return [[mine[i] for i in group] for group in groups]

    # ---- sums over ranks ----------------------------------------------------------------------

    def sum_count(self, value: int) -> int:
        if not self.active:
            return value
        import torch.distributed as dist

        total = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return int(total.item())

    def sum_step(self, adapters: TaskAdapters, task_loss_sums: torch.Tensor, task_tokens: torch.Tensor, tokens: int) -> int:
        """Sum over ranks, in place: every adapter gradient (None counts as zero), the shared
        adapter's per-task bins, the per-task loss sums and token counts. Returns global tokens."""
        if not self.active:
            return tokens
        import torch.distributed as dist

        params = [p for _, p in adapters.named_parameters()]
        bins = [t for layer in adapters.layers.values() if layer.task_grads is not None
                for t in (layer.task_grads.grad_A, layer.task_grads.grad_B)]
        device = self._device()
        grads = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device) for p in params]
            + [b.reshape(-1).to(device) for b in bins]
        )
        dist.all_reduce(grads)
        offset = 0
        for param in params:
            param.grad = grads[offset : offset + param.numel()].view_as(param).to(param.device).clone()
            offset += param.numel()
        for target in bins:
            target.copy_(grads[offset : offset + target.numel()].view_as(target))
            offset += target.numel()
        counts = torch.cat([task_loss_sums, task_tokens.double(), torch.tensor([float(tokens)], dtype=torch.float64)]).to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        num_tasks = task_loss_sums.numel()
        task_loss_sums.copy_(counts[:num_tasks])
        task_tokens.copy_(counts[num_tasks : 2 * num_tasks].round().long())
        return int(counts[-1].round())

    def _device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class SilentLog:
    """The run log of ranks other than 0: rank 0 writes the one `log.jsonl`."""

    def write(self, record: dict) -> None:  # noqa: ARG002
        return None
