"""Per-arm statistics of a live experiment: the comparison of an arm with the control, an interval
that stays valid however often it is looked at, and the sample-ratio-mismatch check.

Everything works from running sums (count, sum, sum of squares), so the server keeps a few numbers
per arm instead of every observation, and the figures survive a restart with them.

The interval and half-width functions accept numpy arrays as well as floats, so a simulation of
thousands of experiments runs through the very code the server uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from router.distributions import chi2_sf, normal_sf, student_t_sf

Z_975 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
SRM_ALPHA = 0.001  # the usual sample-ratio-mismatch threshold: a broken split, not bad luck
# Where the always-valid interval is tightest, in units per arm; its width elsewhere grows only
# like sqrt(log n), so a wrong guess costs little.
MIXTURE_TARGET_UNITS = 1000


@dataclass(frozen=True)
class Moments:
    """Running sums of one arm's observations (rewards, or 0/1 outcomes for a rate)."""

    count: int
    total: float
    total_squares: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def variance(self) -> float:
        """The unbiased sample variance (NaN below two observations)."""
        if self.count < 2:
            return math.nan
        return max(0.0, (self.total_squares - self.total * self.total / self.count) / (self.count - 1))


@dataclass(frozen=True)
class Comparison:
    """`arm` minus `control` on one metric."""

    diff: float
    ci95: tuple[float, float]
    p_value: float
    always_valid_ci95: tuple[float, float]


def t_quantile_975(df):
    """The 0.975 quantile of Student's t (Cornish-Fisher expansion; within 1e-3 for df >= 5),
    vectorised so simulations can use it."""
    z = Z_975
    df = np.asarray(df, dtype=float)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def welch_df(var_a, n_a, var_b, n_b):
    """Welch-Satterthwaite degrees of freedom of a difference of two means."""
    se_a, se_b = var_a / n_a, var_b / n_b
    return (se_a + se_b) ** 2 / (se_a**2 / (n_a - 1) + se_b**2 / (n_b - 1))


def welch_halfwidth(var_a, n_a, var_b, n_b):
    """Half-width of Welch's fixed-horizon 95% interval for mean_b - mean_a."""
    return t_quantile_975(welch_df(var_a, n_a, var_b, n_b)) * np.sqrt(var_a / n_a + var_b / n_b)


def always_valid_halfwidth(variance, mixing_variance, alpha: float = 0.05):
    """Half-width of the always-valid (1 - alpha) interval of a difference whose estimate has
    variance `variance` now.

    This is the two-sample normal mSPRT of Johari, Koomen, Pekelis and Walsh, "Always Valid
    Inference: Continuous Monitoring of A/B Tests" (Operations Research, 2022), eq. for the
    confidence sequence: with V = Var(estimate) and mixing prior N(0, tau^2),
        diff +- sqrt( V (V + tau^2) / tau^2 * ( log((V + tau^2) / V) - 2 log(alpha) ) ).
    The chance that the true difference ever leaves the interval, over every look, is at most
    alpha, so a dashboard may be watched daily. Variances are plug-in estimates, as in that paper's
    deployed version; the guarantee is then asymptotic."""
    variance = np.asarray(variance, dtype=float)
    ratio = (variance + mixing_variance) / mixing_variance
    return np.sqrt(variance * ratio * (np.log((variance + mixing_variance) / variance) - 2 * math.log(alpha)))


def mixing_variance_for(var_a, var_b, target_units: int = MIXTURE_TARGET_UNITS):
    """tau^2 = the variance the difference's estimate will have at `target_units` per arm."""
    return (var_a + var_b) / target_units


def compare_means(control: Moments, arm: Moments) -> Comparison | None:
    """Welch's t test and interval for arm - control, with the always-valid interval; None until
    each side has two observations and some spread."""
    if control.count < 2 or arm.count < 2:
        return None
    var_a, var_b = control.variance, arm.variance
    standard_error = math.sqrt(var_a / control.count + var_b / arm.count)
    diff = arm.mean - control.mean
    if standard_error == 0:
        return None
    df = float(welch_df(var_a, control.count, var_b, arm.count))
    p_value = min(1.0, 2 * student_t_sf(abs(diff) / standard_error, df))
    half = float(welch_halfwidth(var_a, control.count, var_b, arm.count))
    always = float(always_valid_halfwidth(standard_error**2, mixing_variance_for(var_a, var_b)))
    return Comparison(diff, (diff - half, diff + half), p_value, (diff - always, diff + always))


def compare_rates(control: Moments, arm: Moments) -> Comparison | None:
    """Two-proportion z test (pooled under the null) for 0/1 outcomes, the interval from the
    unpooled standard error, and the always-valid interval."""
    if control.count < 1 or arm.count < 1:
        return None
    p_a, p_b = control.mean, arm.mean
    pooled = (control.total + arm.total) / (control.count + arm.count)
    null_se = math.sqrt(pooled * (1 - pooled) * (1 / control.count + 1 / arm.count))
    var_a, var_b = p_a * (1 - p_a), p_b * (1 - p_b)
    standard_error = math.sqrt(var_a / control.count + var_b / arm.count)
    if null_se == 0 or standard_error == 0:
        return None
    diff = p_b - p_a
    p_value = min(1.0, 2 * normal_sf(abs(diff) / null_se))
    half = Z_975 * standard_error
    always = float(always_valid_halfwidth(standard_error**2, mixing_variance_for(var_a, var_b)))
    return Comparison(diff, (diff - half, diff + half), p_value, (diff - always, diff + always))


@dataclass(frozen=True)
class SampleRatioCheck:
    chi2: float
    p_value: float
    flagged: bool


def sample_ratio_mismatch(observed: list[float], expected: list[float]) -> SampleRatioCheck | None:
    """Pearson's chi-square of assigned units against the counts the weights predict. `expected`
    sums, unit by unit, each arm's share at the time that unit was assigned, so re-weighting
    mid-experiment does not raise a false alarm."""
    pairs = [(o, e) for o, e in zip(observed, expected) if e > 0]
    if len(pairs) < 2 or sum(o for o, _ in pairs) == 0:
        return None
    chi2 = sum((o - e) ** 2 / e for o, e in pairs)
    p_value = chi2_sf(chi2, len(pairs) - 1)
    return SampleRatioCheck(chi2, p_value, p_value < SRM_ALPHA)
