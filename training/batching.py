"""Task-tagged micro-batches under a token budget, grouped by length, planned per optimiser step.

A micro-batch holds rows of any tasks; its padded size (rows x longest row) stays within
`batch_tokens`. Examples are drawn from the task sampler a pool at a time, sorted by length and cut
greedily, so rows of similar length share a batch and padding stays small without a fixed maximum
length. The planner's whole state (the sampler's and the micro-batches drawn but not yet used) is
checkpointed, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.data import Example
from training.sampling import TaskSampler

IGNORE_INDEX = -100  # label of tokens the loss skips (prompt and padding), as in torch and HF


@dataclass
class MicroBatch:
    """Right-padded rows: a query at position p sees keys at positions <= p, so the padding after
    a row's end changes none of its real logits."""

    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long: the next token where it is an answer token, else IGNORE_INDEX
    task_ids: torch.Tensor  # (B,) long
    lengths: torch.Tensor  # (B,) long: each row's real (unpadded) length

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def task_answer_tokens(self, num_tasks: int) -> torch.Tensor:
        """(num_tasks,) answer tokens per task."""
        counts = (self.labels != IGNORE_INDEX).sum(1)
        return torch.zeros(num_tasks, dtype=torch.long).index_add_(0, self.task_ids, counts)


def collate(rows: Sequence[tuple[int, Example]], pad_id: int) -> MicroBatch:
    """(task, example) rows -> a right-padded MicroBatch with next-token labels."""
    length = max(len(example) for _, example in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (_, example) in enumerate(rows):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
        # Position i predicts token i+1: label it when token i+1 is an answer token.
        labels[row, : len(ids) - 1] = torch.where(mask, ids[1:], IGNORE_INDEX)
    task_ids = torch.tensor([task for task, _ in rows], dtype=torch.long)
    lengths = torch.tensor([len(example) for _, example in rows], dtype=torch.long)
    return MicroBatch(input_ids, labels, task_ids, lengths)


def pack_by_length(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths` cut into groups of similar length whose padded size
    (rows x longest) fits `batch_tokens`; a row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index]  # ascending order: the newcomer is the longest so far
        if current and (len(current) + 1) * longest > batch_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


class BatchPlanner:
    """Yields, per optimiser step, the list of micro-batches ((task, example index) rows).

    A step draws examples from the task sampler until one more would need more than
    `accumulation` micro-batches, then groups that step's rows by length. Drawing per step keeps
    every step's task mix the sampled one (grouping a large pool by length instead would sort the
    tasks apart whenever their lengths differ, leaving surgery single-task steps), while rows of
    similar length still share a micro-batch."""

    def __init__(
        self,
        sampler: TaskSampler,
        lengths: Sequence[Sequence[int]],  # lengths[task][example]
        batch_tokens: int,
        accumulation: int,
    ) -> None:
        self.sampler = sampler
        self.lengths = lengths
        self.batch_tokens = batch_tokens
        self.accumulation = accumulation
        self.carry: list[tuple[int, int]] = []  # drawn for a step it did not fit; opens the next

    def _groups(self, rows: list[tuple[int, int]]) -> list[list[int]]:
        return pack_by_length([self.lengths[task][index] for task, index in rows], self.batch_tokens)

    def next_step(self) -> list[list[tuple[int, int]]]:
        rows, self.carry = self.carry, []
        while True:
            drawn = self.sampler.draw()
            if rows and len(self._groups([*rows, drawn])) > self.accumulation:
                self.carry = [drawn]
                break
            rows.append(drawn)
        return [[rows[i] for i in group] for group in self._groups(rows)]

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "carry": [list(row) for row in self.carry]}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.carry = [(int(t), int(i)) for t, i in state["carry"]]
