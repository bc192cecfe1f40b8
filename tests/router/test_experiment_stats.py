import math

import numpy as np
import pytest

from router.distributions import chi2_sf, normal_sf, student_t_sf
from router.experiment_stats import (
    Moments,
    always_valid_halfwidth,
    compare_means,
    compare_rates,
    mixing_variance_for,
    sample_ratio_mismatch,
    welch_halfwidth,
)

ALPHA = 0.05


def numeric_sf(pdf, x, upper):
    """Oracle: the tail integral by the trapezoid rule, on a fine grid near x and a coarser one
    further out where the density is flat."""
    near, far = np.linspace(x, x + 60.0, 600_001), np.linspace(x + 60.0, upper, 400_001)
    return float(np.trapezoid(pdf(near), near) + np.trapezoid(pdf(far), far))


@pytest.mark.parametrize("t, df", [(2.0, 10.0), (0.5, 3.0), (3.1, 7.4), (1.0, 150.0)])
def test_student_t_tail_matches_numeric_integration(t, df):
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: const * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    assert student_t_sf(t, df) == pytest.approx(numeric_sf(pdf, t, 4_000.0), abs=2e-6)
    assert student_t_sf(-t, df) == pytest.approx(1 - student_t_sf(t, df), abs=1e-12)


@pytest.mark.parametrize("x, k", [(3.841458820694124, 1), (10.0, 3), (100.0, 50), (0.5, 4)])
def test_chi_square_tail_matches_numeric_integration(x, k):
    const = 1 / (2 ** (k / 2) * math.gamma(k / 2))
    pdf = lambda v: const * v ** (k / 2 - 1) * np.exp(-v / 2)  # noqa: E731
    assert chi2_sf(x, k) == pytest.approx(numeric_sf(pdf, x, x + 400.0), rel=1e-5, abs=1e-9)


def test_normal_tail():
    assert normal_sf(1.959963984540054) == pytest.approx(0.025, abs=1e-12)


def moments(values):
    values = np.asarray(values, dtype=float)
    return Moments(len(values), float(values.sum()), float((values**2).sum()))


def test_welch_comparison_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 40), rng.normal(0.5, 2.0, 25)
    result = compare_means(moments(a), moments(b))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    assert result.diff == pytest.approx(b.mean() - a.mean())
    assert result.p_value == pytest.approx(2 * student_t_sf(abs(t), df), rel=1e-9)
    # The interval and the test agree: the 95% interval excludes 0 exactly when p < 0.05.
    assert (result.ci95[0] > 0 or result.ci95[1] < 0) == (result.p_value < 0.05)
    assert result.always_valid_ci95[0] < result.ci95[0] and result.always_valid_ci95[1] > result.ci95[1]


def test_two_proportion_test_matches_the_pooled_z_formula():
    control, arm = Moments(400, 120, 120), Moments(380, 140, 140)
    result = compare_rates(control, arm)
    pooled = 260 / 780
    z = (140 / 380 - 120 / 400) / math.sqrt(pooled * (1 - pooled) * (1 / 400 + 1 / 380))
    assert result.p_value == pytest.approx(2 * normal_sf(abs(z)))
    assert compare_rates(Moments(10, 0, 0), Moments(10, 0, 0)) is None  # no spread: nothing to say


def simulate_peeking(effect: float, seed: int, experiments: int = 1_000, units: int = 2_000, every: int = 100):
    """Rejections of 1,000 simulated two-arm experiments (units alternate between arms), looking
    after every `every` units: by the fixed-horizon Welch interval at each look, by it at the end
    only, and by the always-valid interval at each look."""
    rng = np.random.default_rng(seed)
    per_arm = units // 2
    control = rng.normal(0.0, 1.0, (experiments, per_arm))
    treated = rng.normal(effect, 1.0, (experiments, per_arm))
    looks = np.arange(every // 2, per_arm + 1, every // 2)  # units per arm at each look

    def running(x):
        total, squares = np.cumsum(x, axis=1)[:, looks - 1], np.cumsum(x**2, axis=1)[:, looks - 1]
        mean = total / looks
        return mean, (squares - looks * mean**2) / (looks - 1)

    mean_a, var_a = running(control)
    mean_b, var_b = running(treated)
    diff = np.abs(mean_b - mean_a)
    fixed = diff > welch_halfwidth(var_a, looks, var_b, looks)
    always = diff > always_valid_halfwidth(var_a / looks + var_b / looks, mixing_variance_for(var_a, var_b), ALPHA)
    return fixed.any(axis=1).mean(), fixed[:, -1].mean(), always.any(axis=1).mean(), always[:, -1].mean()


def test_aa_peeking_inflates_the_fixed_test_but_not_the_always_valid_interval():
    fixed_peeking, fixed_once, always_peeking, _ = simulate_peeking(effect=0.0, seed=7)
    sd = math.sqrt(ALPHA * (1 - ALPHA) / 1_000)
    assert abs(fixed_once - ALPHA) <= 3 * sd  # one look: rejects at about alpha
    assert fixed_peeking > 2 * ALPHA  # twenty looks: far above alpha
    assert always_peeking <= ALPHA  # twenty looks, still at or below alpha


def test_a_planted_effect_is_found_by_both():
    # 0.2 standard deviations with 1,000 units per arm: the fixed test's power is about 0.99; the
    # always-valid interval pays for its safety with power, about 0.8 here.
    _, fixed_once, always_peeking, _ = simulate_peeking(effect=0.2, seed=11)
    assert fixed_once >= 0.95
    assert always_peeking >= 0.7


def test_compare_means_uses_the_same_intervals_as_the_simulation():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 500), rng.normal(0.1, 1, 500)
    result = compare_means(moments(a), moments(b))
    va, vb = a.var(ddof=1), b.var(ddof=1)
    half = always_valid_halfwidth(va / 500 + vb / 500, mixing_variance_for(va, vb), ALPHA)
    assert result.always_valid_ci95[1] - result.diff == pytest.approx(float(half))


def test_sample_ratio_mismatch_flags_a_planted_55_45_split():
    rng = np.random.default_rng(5)
    units = 10_000
    broken = int((rng.random(units) < 0.55).sum())
    fair = int((rng.random(units) < 0.50).sum())
    flagged = sample_ratio_mismatch([broken, units - broken], [units / 2, units / 2])
    healthy = sample_ratio_mismatch([fair, units - fair], [units / 2, units / 2])
    assert flagged.flagged and flagged.p_value < 1e-10
    assert not healthy.flagged
    assert sample_ratio_mismatch([0, 0], [0, 0]) is None
