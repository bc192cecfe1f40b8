"""Gradient surgery on the shared adapter's per-task gradients (DESIGN decision 4).

Every method takes the T per-task gradients of the shared adapter flattened into one matrix
G (T, D) — each row the concatenation of that task's gradients over all shared layers — and
returns the single gradient (D,) the optimiser applies. Task-private adapters need none of this:
only their own task reaches them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
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


def cagrad(task_grads: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, Algorithm 1). With g0 the mean task gradient, the update d maximises
    the worst task's improvement min_i g_i . d within the ball ||d - g0|| <= c ||g0||. Its dual,
        min over w in the simplex of  F(w) = g_w . g0 + c ||g0|| ||g_w||,   g_w = sum_i w_i g_i,
    needs only the Gram matrix G = g g^T (T x T), so the solve costs nothing in the adapter's size;
    then d = g0 + c ||g0|| / ||g_w|| g_w. Returned times the number of tasks, so c = 0 gives the
    plain sum like the other methods. Tasks without rows this step (zero gradient) are left out:
    their 0 would cap the worst-case improvement at 0 and stall every other task."""
    if not 0.0 <= c < 1.0:
        raise SurgeryError(f"cagrad c must be in [0, 1), got {c}; 0.5 is the paper's value (0 = the plain sum)")
    grads = task_grads.double()
    present = grads[grads.norm(dim=1) > 0]  # (P, D)
    if present.shape[0] == 0:
        return task_grads.sum(0)
    num_present = present.shape[0]
    gram = (present @ present.T).numpy()  # (P, P)
    g0 = present.mean(0)
    radius = c * float(g0.norm())
    if radius == 0.0:
        return (g0 * num_present).to(task_grads.dtype)
    weights = torch.from_numpy(cagrad_dual_weights(gram, radius))
    g_w = weights @ present
    g_w_norm = float(g_w.norm())
    direction = g0 + radius / g_w_norm * g_w if g_w_norm > 0 else g0
    return (direction * num_present).to(task_grads.dtype)


EXACT_CAGRAD_TASKS = 12  # 2^12 supports of ~25 us each: under 0.1 s per step


def cagrad_dual_weights(gram: np.ndarray, radius: float) -> np.ndarray:
    """argmin over the simplex of F(w) = w.G.b + radius sqrt(w.G.w) (b = uniform weights).

    Up to EXACT_CAGRAD_TASKS tasks, exactly: the optimum is the stationary point of F on the face
    of the simplex that holds it, which has a closed form, so every face is solved and the best
    feasible point kept. Beyond that, projected gradient descent (approximate)."""
    num_tasks = gram.shape[0]
    linear = gram @ np.full(num_tasks, 1.0 / num_tasks)
    candidates = list(np.eye(num_tasks))
    if num_tasks <= EXACT_CAGRAD_TASKS:
        for size in range(2, num_tasks + 1):
            for support in itertools.combinations(range(num_tasks), size):
                candidates += _stationary_points_on_face(gram, linear, radius, np.array(support))
    else:
        candidates.append(_projected_gradient(gram, linear, radius))
    return min(candidates, key=lambda w: _cagrad_dual(gram, linear, radius, w))


def _cagrad_dual(gram: np.ndarray, linear: np.ndarray, radius: float, weights: np.ndarray) -> float:
    return float(weights @ linear + radius * math.sqrt(max(float(weights @ gram @ weights), 0.0)))


def _stationary_points_on_face(gram: np.ndarray, linear: np.ndarray, radius: float, support: np.ndarray) -> list[np.ndarray]:
    """Points of the face {w >= 0, sum w = 1, w = 0 off `support`} where the gradient of F is
    constant (= lambda) on the support. With s = ||g_w||: a + radius G w / s = lambda 1 gives
    w = (s / radius)(lambda u - v), u = G^-1 1, v = G^-1 a; s^2 = w.G.w then makes lambda a root of
    sum(u) lambda^2 - 2 sum(v) lambda + a.v - radius^2 = 0, and sum(w) = 1 fixes s."""
    face_gram = gram[np.ix_(support, support)]
    try:
        u = np.linalg.solve(face_gram, np.ones(len(support)))
        v = np.linalg.solve(face_gram, linear[support])
    except np.linalg.LinAlgError:  # dependent gradients: a smaller face holds the same optimum
        return []
    sum_u, sum_v, a_v = u.sum(), v.sum(), linear[support] @ v
    discriminant = sum_v * sum_v - sum_u * (a_v - radius * radius)
    if sum_u <= 0 or discriminant < 0:
        return []
    points = []
    for root in ((sum_v + math.sqrt(discriminant)) / sum_u, (sum_v - math.sqrt(discriminant)) / sum_u):
        on_face = root * u - v  # proportional to w; its sum must be positive (s > 0)
        if on_face.sum() <= 0 or on_face.min() < -1e-12 * on_face.sum():
            continue
        weights = np.zeros(gram.shape[0])
        weights[support] = np.maximum(on_face, 0.0) / on_face.sum()
        points.append(weights)
    return points


def _projected_gradient(gram: np.ndarray, linear: np.ndarray, radius: float, iterations: int = 2000) -> np.ndarray:
    num_tasks = gram.shape[0]
    weights = np.full(num_tasks, 1.0 / num_tasks)
    value = _cagrad_dual(gram, linear, radius, weights)
    step = 1.0 / max(float(np.trace(gram)), 1e-300)
    for _ in range(iterations):
        gradient = linear + radius * (gram @ weights) / math.sqrt(max(float(weights @ gram @ weights), 1e-300))
        while True:  # backtracking until the quadratic upper bound holds
            candidate = project_to_simplex(weights - step * gradient)
            move = candidate - weights
            candidate_value = _cagrad_dual(gram, linear, radius, candidate)
            if candidate_value <= value + gradient @ move + move @ move / (2 * step) or step < 1e-300:
                break
            step /= 2
        if np.abs(move).max() < 1e-15:
            break
        weights, value, step = candidate, candidate_value, step * 1.5
    return weights


def project_to_simplex(point: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al. 2008)."""
    ordered = np.sort(point)[::-1]
    cumulative = np.cumsum(ordered) - 1
    support = int((ordered - cumulative / np.arange(1, len(point) + 1) > 0).sum())
    return np.maximum(point - cumulative[support - 1] / support, 0.0)


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


SURGERY_METHODS = ("none", "pcgrad", "gradvac", "cagrad")


class Surgery:
    """The configured method, callable on (T, D) per-task gradients, with its state."""

    def __init__(self, method: str, num_tasks: int, seed: int, gradvac_beta: float = 0.01, cagrad_c: float = 0.5) -> None:
        if method not in SURGERY_METHODS:
            raise SurgeryError(f"unknown surgery method {method!r}; choose one of {', '.join(SURGERY_METHODS)}")
        if method == "cagrad" and not 0.0 <= cagrad_c < 1.0:
            raise SurgeryError(f"surgery.c must be in [0, 1), got {cagrad_c}; 0.5 is the paper's value (0 = the plain sum)")
        self.method = method
        self.cagrad_c = cagrad_c
        self.generator = torch.Generator().manual_seed(seed)  # the random task orders
        self.gradvac = GradVac(num_tasks, gradvac_beta) if method == "gradvac" else None

    def __call__(self, task_grads: torch.Tensor) -> torch.Tensor:
        if self.method == "pcgrad":
            return pcgrad(task_grads, self.generator)
        if self.gradvac is not None:
            return self.gradvac(task_grads, self.generator)
        if self.method == "cagrad":
            return cagrad(task_grads, self.cagrad_c)
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
