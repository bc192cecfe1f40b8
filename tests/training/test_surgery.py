"""PCGrad, GradVac and CAGrad against the papers' definitions on hand-made gradients."""

import math

import pytest
import torch

from training.surgery import (
    EXACT_CAGRAD_TASKS,
    GradVac,
    Surgery,
    SurgeryError,
    cagrad,
    cagrad_dual_weights,
    conflict_rate,
    cosine_matrix,
    pcgrad,
)


def paper_pcgrad(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1, in plain Python lists with the given per-task orders."""
    rows = [list(map(float, g)) for g in grads]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    result = [0.0] * len(rows[0])
    for i, order in enumerate(orders):
        g = list(rows[i])
        for j in order:
            if j == i:
                continue
            d = dot(g, rows[j])
            if d < 0:
                g = [a - d / dot(rows[j], rows[j]) * b for a, b in zip(g, rows[j])]
        result = [r + a for r, a in zip(result, g)]
    return torch.tensor(result, dtype=torch.float64)


def test_pcgrad_two_conflicting_tasks_matches_hand_result():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum = (0.5, 1.5)
    torch.testing.assert_close(pcgrad(grads), torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_projected_gradients_no_longer_conflict():
    grads = torch.tensor([[2.0, 1.0, 0.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
    result = pcgrad(grads)
    g1 = grads[0] - (grads[0] @ grads[1]) / (grads[1] @ grads[1]) * grads[1]
    assert abs(float(g1 @ grads[1])) < 1e-12
    g2 = grads[1] - (grads[1] @ grads[0]) / (grads[0] @ grads[0]) * grads[0]
    torch.testing.assert_close(result, g1 + g2)


def test_pcgrad_many_tasks_matches_paper_with_same_random_orders():
    torch.manual_seed(0)
    grads = torch.randn(5, 12, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    result = pcgrad(grads, generator)
    replay = torch.Generator().manual_seed(3)
    orders = [torch.randperm(5, generator=replay).tolist() for _ in range(5)]
    torch.testing.assert_close(result, paper_pcgrad(grads, orders), atol=1e-10, rtol=1e-10)


def test_pcgrad_without_conflict_is_the_plain_sum():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.1, 3.0], [0.0, 1.0, 1.0]])
    assert (cosine_matrix(grads) >= 0).all()
    torch.testing.assert_close(pcgrad(grads), grads.sum(0))


def test_gradvac_lifts_cosine_to_its_target():
    grads = torch.tensor([[1.0, 0.2], [-0.8, 1.0]], dtype=torch.float64)
    vac = GradVac(num_tasks=2, beta=0.5)  # targets start at 0
    result = vac(grads, torch.Generator().manual_seed(0))
    # With target 0 each adjusted g_i' is orthogonal to the other original g_j, as PCGrad's.
    torch.testing.assert_close(result, pcgrad(grads))
    # The EMA moved toward the observed cosine.
    observed = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    assert math.isclose(float(vac.targets[0, 1]), 0.5 * observed, rel_tol=1e-9)


def test_gradvac_positive_target_reaches_that_cosine():
    grads = torch.tensor([[1.0, 0.0, 0.3], [-0.5, 1.0, 0.0]], dtype=torch.float64)
    vac = GradVac(num_tasks=2, beta=0.01)
    vac.targets.fill_(0.3)

    def lifted(i, j):  # Wang et al. 2021, eq. 3: the multiple of g_j that makes cos(g_i', g_j) = target
        g_i, g_j = grads[i], grads[j]
        cos = float(g_i @ g_j / (g_i.norm() * g_j.norm()))
        coeff = g_i.norm() * (0.3 * math.sqrt(1 - cos**2) - cos * math.sqrt(1 - 0.3**2)) / (g_j.norm() * math.sqrt(1 - 0.3**2))
        return g_i + coeff * g_j

    for i, j in ((0, 1), (1, 0)):
        adjusted = lifted(i, j)
        assert math.isclose(float(adjusted @ grads[j] / (adjusted.norm() * grads[j].norm())), 0.3, rel_tol=1e-9)
    torch.testing.assert_close(vac(grads, torch.Generator().manual_seed(0)), lifted(0, 1) + lifted(1, 0))


def test_conflict_rate_counts_negative_pairs_of_present_tasks():
    cos = torch.tensor([[1.0, -0.2, 0.3], [-0.2, 1.0, -0.5], [0.3, -0.5, 1.0]])
    assert conflict_rate(cos, torch.tensor([True, True, True])) == 2 / 3
    assert conflict_rate(cos, torch.tensor([True, False, True])) == 0.0


def test_surgery_state_round_trips():
    surgery = Surgery("gradvac", num_tasks=3, seed=1)
    grads = torch.randn(3, 8)
    surgery(grads)
    state = surgery.state_dict()
    again = Surgery("gradvac", num_tasks=3, seed=99)
    again.load_state_dict(state)
    torch.testing.assert_close(surgery(grads), again(grads))


def test_gradvac_targets_stay_indexed_by_task_when_a_task_is_absent():
    gradvac = GradVac(num_tasks=3, beta=0.5)
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])  # task 1 has no rows this step
    gradvac(grads, torch.Generator().manual_seed(0))
    assert gradvac.targets[0, 2] != 0 and gradvac.targets[2, 0] != 0
    assert gradvac.targets[0, 1] == 0 and gradvac.targets[1, 2] == 0 and gradvac.targets[2, 1] == 0


def _cagrad_dual(grads: torch.Tensor, weights: torch.Tensor, c: float) -> float:
    """Liu et al. 2021, eq. (dual): F(w) = g_w . g0 + c ||g0|| ||g_w|| (g0 the mean gradient)."""
    g0 = grads.mean(0)
    g_w = weights @ grads
    return float(g_w @ g0 + c * g0.norm() * g_w.norm())


def test_cagrad_with_c_zero_is_the_plain_sum():
    grads = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.3, -2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cagrad(grads, c=0.0), grads.sum(0))


def test_cagrad_two_tasks_match_the_papers_update_by_grid_search():
    grads = torch.tensor([[2.0, 0.3], [-1.0, 1.5]], dtype=torch.float64)
    c = 0.5
    # The dual over the simplex {(w, 1-w)} on a fine grid, then the paper's d = g0 + c||g0|| g_w/||g_w||.
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    g_w = grid[:, None] * grads[0] + (1 - grid)[:, None] * grads[1]
    g0 = grads.mean(0)
    values = g_w @ g0 + c * g0.norm() * g_w.norm(dim=1)
    best = g_w[values.argmin()]
    paper = g0 + c * g0.norm() * best / best.norm()
    torch.testing.assert_close(cagrad(grads, c) / 2, paper, atol=1e-5, rtol=0)


def test_cagrad_closes_the_duality_gap_on_random_conflicting_tasks():
    """For any d in the ball ||d - g0|| <= c||g0|| and any w in the simplex, min_i g_i.d <= F(w)
    (weak duality). The returned d (over T) is in the ball, and F at the solver's w equals its
    worst-task improvement: a certificate that d is THE optimum of the paper's problem."""
    generator = torch.Generator().manual_seed(5)
    cases = [(2, 3, 0.5), (3, 4, 0.5), (5, 20, 0.8), (4, 3, 0.2), (8, 5, 0.5), (12, 40, 0.5), (6, 1000, 0.9)]
    for tasks, dim, c in cases:
        grads = torch.randn(tasks, dim, generator=generator, dtype=torch.float64)
        grads[1] = -0.7 * grads[0] + 0.1 * grads[1]  # a strong conflict
        direction = cagrad(grads, c) / tasks
        g0 = grads.mean(0)
        assert float((direction - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
        worst = float((grads @ direction).min())
        weights = cagrad_dual_weights((grads @ grads.T).numpy(), c * float(g0.norm()))
        assert weights.min() >= 0 and abs(weights.sum() - 1) < 1e-12
        dual = _cagrad_dual(grads, torch.from_numpy(weights), c)
        assert abs(dual - worst) < 1e-9 * max(1.0, abs(worst)), (tasks, dim, dual, worst)


def test_cagrad_beyond_the_exact_solver_is_near_the_optimum():
    generator = torch.Generator().manual_seed(2)
    tasks = EXACT_CAGRAD_TASKS + 4
    grads = torch.randn(tasks, 64, generator=generator, dtype=torch.float64)
    grads[1] = -0.7 * grads[0] + 0.1 * grads[1]
    direction = cagrad(grads, 0.5) / tasks
    g0 = grads.mean(0)
    weights = cagrad_dual_weights((grads @ grads.T).numpy(), 0.5 * float(g0.norm()))
    worst = float((grads @ direction).min())
    assert abs(_cagrad_dual(grads, torch.from_numpy(weights), 0.5) - worst) < 1e-3 * float(g0.norm()) ** 2


def test_cagrad_leaves_out_tasks_without_rows():
    grads = torch.tensor([[1.0, 0.2], [0.0, 0.0], [-0.8, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cagrad(grads, 0.5), cagrad(grads[[0, 2]], 0.5))


def test_cagrad_c_out_of_range_names_the_setting():
    with pytest.raises(SurgeryError, match=r"surgery.c must be in \[0, 1\), got 1.5"):
        Surgery("cagrad", 2, seed=0, cagrad_c=1.5)
    with pytest.raises(SurgeryError, match=r"cagrad c must be in \[0, 1\), got -0.1"):
        cagrad(torch.ones(2, 3), c=-0.1)
