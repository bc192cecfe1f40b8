"""How often each task is drawn when batches mix tasks, and the draw itself.

Strategies (n_i = task i's number of training examples):
  proportional   p_i ∝ n_i
  temperature    p_i ∝ n_i^(1/T)          T=1 is proportional, T→∞ uniform
  weights        p_i ∝ w_i                 the tasks' `weight` fields
  cap            p_i ∝ min(n_i, K)         T5's examples-proportional mixing with cap K
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SAMPLING_STRATEGIES = ("proportional", "temperature", "weights", "cap")


class SamplingError(ValueError):
    """Sampling settings that cannot give a distribution."""


def mixing_probabilities(
    sizes: Sequence[int],
    strategy: str,
    temperature: float = 1.0,
    cap: int | None = None,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """The probability of drawing each task, by `strategy`."""
    if not sizes:
        raise SamplingError("no tasks to sample from; list at least one trainable task under `tasks`")
    counts = torch.tensor([float(n) for n in sizes], dtype=torch.float64)
    if strategy == "proportional":
        raw = counts
    elif strategy == "temperature":
        if temperature <= 0:
            raise SamplingError(f"sampling.temperature must be > 0, got {temperature}; 1 = proportional, larger = flatter")
        raw = counts ** (1.0 / temperature)
    elif strategy == "weights":
        if weights is None or any(w is None for w in weights):
            raise SamplingError("sampling.strategy 'weights' needs a `weight` on every trainable task; add them or pick another strategy")
        raw = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        if (raw < 0).any():
            raise SamplingError("task weights must be >= 0; fix the negative `weight`")
    elif strategy == "cap":
        if cap is None or cap <= 0:
            raise SamplingError("sampling.strategy 'cap' needs sampling.cap (K) > 0, e.g. cap: 1000")
        raw = counts.clamp(max=float(cap))
    else:
        raise SamplingError(f"unknown sampling.strategy {strategy!r}; choose one of {', '.join(SAMPLING_STRATEGIES)}")
    total = float(raw.sum())
    if total <= 0:
        raise SamplingError("every task has probability 0; give some task examples or a positive weight")
    return (raw / total).tolist()


class TaskSampler:
    """An endless stream of (task, example index): the task by the mixing probabilities, the
    example as the next one of that task's own shuffled pass over its data (reshuffled each
    pass), so every example is seen once per pass. The whole state is checkpointed."""

    def __init__(self, sizes: Sequence[int], probabilities: Sequence[float], seed: int) -> None:
        if any(n <= 0 for n in sizes):
            raise SamplingError("a trainable task has no training examples; check its train file")
        self.sizes = list(sizes)
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.orders: list[list[int]] = [self._shuffle(n) for n in self.sizes]
        self.cursors = [0] * len(self.sizes)
        self.passes = [0] * len(self.sizes)
        self.drawn = [0] * len(self.sizes)  # the realised mix, logged

    def _shuffle(self, size: int) -> list[int]:
        return torch.randperm(size, generator=self.generator).tolist()

    def draw(self) -> tuple[int, int]:
        task = int(torch.multinomial(self.probabilities, 1, generator=self.generator))
        if self.cursors[task] == self.sizes[task]:
            self.orders[task] = self._shuffle(self.sizes[task])
            self.cursors[task] = 0
            self.passes[task] += 1
        example = self.orders[task][self.cursors[task]]
        self.cursors[task] += 1
        self.drawn[task] += 1
        return task, example

    def realised_mix(self) -> list[float]:
        total = sum(self.drawn)
        return [n / total if total else 0.0 for n in self.drawn]

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "orders": [list(o) for o in self.orders],
            "cursors": list(self.cursors),
            "passes": list(self.passes),
            "drawn": list(self.drawn),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.orders = [list(o) for o in state["orders"]]
        self.cursors = list(state["cursors"])
        self.passes = list(state["passes"])
        self.drawn = list(state["drawn"])
