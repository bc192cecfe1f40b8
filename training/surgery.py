"""Gradient surgery on the shared adapter's per-task gradients (DESIGN decision 4).

Every method takes the T per-task gradients of the shared adapter flattened into one matrix
G (T, D) — each row the concatenation of that task's gradients over all shared layers — and
returns the single gradient (D,) the optimiser applies. Task-private adapters need none of this:
only their own task reaches them.
"""

from __future__ import annotations

import math

import torch


class SurgeryError(ValueError):
    """A surgery method or its settings are unknown or out of range."""


def plain_sum(task_grads: torch.Tensor) -> torch.Tensor:
    """No surgery: the ordinary gradient of the summed loss."""
    return task_grads.sum(0)


def pcgrad(task_grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1). For each task i, start from g_i; for the other tasks j
    in a random order, if g_i' . g_j < 0 remove from g_i' its component along the ORIGINAL g_j;
    return the sum of the projected g_i'."""
    num_tasks = task_grads.shape[0]
    grads = task_grads.double()  # projections in fp64 so the oracle tests can hold to 1e-6
    sq_norms = (grads * grads).sum(1)
    projected = grads.clone()
    for i in range(num_tasks):
        order = torch.randperm(num_tasks, generator=generator).tolist()
        for j in order:
            if j == i or sq_norms[j] == 0:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / sq_norms[j] * grads[j]
    return projected.sum(0).to(task_grads.dtype)


class GradVac:
    """Gradient Vaccine (Wang et al. 2021, Algorithm 1) over the flattened shared gradient.

    Keeps an EMA target phi_hat_ij of the cosine between tasks i and j; when the current cosine
    of g_i' with g_j falls below its target, adds the multiple of g_j that lifts it exactly to the
    target. The EMA is state: it travels with checkpoints (`state_dict`)."""

    def __init__(self, num_tasks: int, beta: float = 0.01) -> None:
        if not 0.0 < beta <= 1.0:
            raise SurgeryError(f"gradvac beta must be in (0, 1], got {beta}; 0.01 is the paper's value")
        self.beta = beta
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)  # phi_hat, starts at 0

    def __call__(self, task_grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        num_tasks = task_grads.shape[0]
        grads = task_grads.double()
        norms = grads.norm(dim=1)
        adjusted = grads.clone()
        for i in range(num_tasks):
            for j in torch.randperm(num_tasks, generator=generator).tolist():
                if j == i or norms[j] == 0:
                    continue
                norm_i = adjusted[i].norm()
                if norm_i == 0:
                    continue
                cosine = float(adjusted[i] @ grads[j] / (norm_i * norms[j]))
                target = float(self.targets[i, j])
                if cosine < target:
                    coeff = norm_i * (target * math.sqrt(1 - cosine**2) - cosine * math.sqrt(1 - target**2))
                    adjusted[i] += coeff / (norms[j] * math.sqrt(1 - target**2)) * grads[j]
                self.targets[i, j] = (1 - self.beta) * target + self.beta * cosine
        return adjusted.sum(0).to(task_grads.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"targets": self.targets.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.targets = state["targets"].clone()


def cosine_matrix(task_grads: torch.Tensor) -> torch.Tensor:
    """(T, T) cosines between the task gradients; 0 where a task has no gradient."""
    grads = task_grads.double()
    norms = grads.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = grads / safe[:, None]
    return (unit @ unit.T).to(torch.float32)


def conflict_rate(cosines: torch.Tensor, present: torch.Tensor) -> float:
    """Share of pairs of present tasks whose gradients conflict (negative cosine)."""
    tasks = present.nonzero().squeeze(1).tolist()
    pairs = [(i, j) for a, i in enumerate(tasks) for j in tasks[a + 1 :]]
    if not pairs:
        return 0.0
    return sum(1 for i, j in pairs if cosines[i, j] < 0) / len(pairs)


SURGERY_METHODS = ("none", "pcgrad", "gradvac")


class Surgery:
    """The configured method, callable on (T, D) per-task gradients, with its state."""

    def __init__(self, method: str, num_tasks: int, seed: int, gradvac_beta: float = 0.01) -> None:
        if method not in SURGERY_METHODS:
            raise SurgeryError(f"unknown surgery method {method!r}; choose one of {', '.join(SURGERY_METHODS)}")
        self.method = method
        self.generator = torch.Generator().manual_seed(seed)  # the random task orders
        self.gradvac = GradVac(num_tasks, gradvac_beta) if method == "gradvac" else None

    def __call__(self, task_grads: torch.Tensor) -> torch.Tensor:
        if self.method == "pcgrad":
            return pcgrad(task_grads, self.generator)
        if self.gradvac is not None:
            return self.gradvac(task_grads, self.generator)
        return plain_sum(task_grads)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "gradvac": self.gradvac.state_dict() if self.gradvac is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.gradvac is not None and state.get("gradvac") is not None:
            self.gradvac.load_state_dict(state["gradvac"])
