"""The figures of `GET /v1/experiments/{name}` (and the report), from the store's counters."""

from __future__ import annotations

import math

from router.experiment_stats import Comparison, Moments, compare_means, compare_rates, sample_ratio_mismatch
from router.experiments import Experiment
from router.latency_histogram import quantile

SHADOW_ARM = "(shadow)"  # the shadow's counters; parentheses keep it apart from any arm name
VERSION_PREFIX = "version:"  # counters of requests per adapter version that answered


def reward_moments(counters: dict[str, float]) -> Moments:
    return Moments(int(counters.get("reward_n", 0)), counters.get("reward_sum", 0.0), counters.get("reward_sumsq", 0.0))


def thumbs_moments(counters: dict[str, float]) -> Moments:
    up = counters.get("thumbs_up", 0.0)
    return Moments(int(counters.get("thumbs_n", 0)), up, up)  # 0/1 outcomes: squares = values


def summarize(
    experiment: Experiment,
    counters: dict[str, dict[str, float]],
    latency_bins: dict[tuple[str, str], dict[int, int]],
    labels: dict[str, dict[str, int]],
) -> dict:
    arms = [_arm_figures(experiment, arm.name, counters.get(arm.name, {}), latency_bins, labels) for arm in experiment.arms]
    control = counters.get(experiment.control, {})
    comparisons = []
    for arm in experiment.arms:
        if arm.name == experiment.control:
            continue
        mine = counters.get(arm.name, {})
        comparisons.append(_comparison(arm.name, experiment.control, "reward",
                                       compare_means(reward_moments(control), reward_moments(mine))))
        if thumbs_moments(control).count or thumbs_moments(mine).count:
            comparisons.append(_comparison(arm.name, experiment.control, "thumbs_up_rate",
                                           compare_rates(thumbs_moments(control), thumbs_moments(mine))))
    observed = [counters.get(arm.name, {}).get("assignments", 0.0) for arm in experiment.arms]
    expected = [counters.get(arm.name, {}).get("expected_assignments", 0.0) for arm in experiment.arms]
    srm = sample_ratio_mismatch(observed, expected)
    summary = {
        **experiment.to_json(),
        "arms": arms,
        "comparisons": comparisons,
        "srm": {
            "chi2": _finite(srm.chi2) if srm else None,
            "p_value": _finite(srm.p_value) if srm else None,
            "flagged": srm.flagged if srm else False,
            "observed": dict(zip([arm.name for arm in experiment.arms], observed)),
            "expected": {arm.name: round(e, 3) for arm, e in zip(experiment.arms, expected)},
        },
    }
    if experiment.shadow is not None:
        shadow = counters.get(SHADOW_ARM, {})
        summary["shadow"] = {
            **experiment.to_json()["shadow"],
            "requests": int(shadow.get("requests", 0)),
            "errors": int(shadow.get("errors", 0)),
            "dropped": int(shadow.get("dropped", 0)),
            "preempted": int(shadow.get("preempted", 0)),  # cancelled to give their row to live requests
            "completion_tokens": int(shadow.get("completion_tokens", 0)),
            "latency_p50_s": quantile(latency_bins.get((SHADOW_ARM, "total"), {}), 0.5),
        }
    return summary


def _arm_figures(experiment: Experiment, name: str, counters: dict[str, float],
                 latency_bins: dict[tuple[str, str], dict[int, int]], labels: dict[str, dict[str, int]]) -> dict:
    arm = experiment.arm(name)
    reward, thumbs = reward_moments(counters), thumbs_moments(counters)
    ttft, total = latency_bins.get((name, "ttft"), {}), latency_bins.get((name, "total"), {})
    return {
        "name": name,
        "adapter": arm.adapter if arm else None,
        "weight": arm.weight if arm else None,
        "assignments": int(counters.get("assignments", 0)),
        "requests": int(counters.get("requests", 0)),
        "errors": int(counters.get("errors", 0)),
        "prompt_tokens": int(counters.get("prompt_tokens", 0)),
        "completion_tokens": int(counters.get("completion_tokens", 0)),
        "ttft_p50_s": quantile(ttft, 0.5),
        "ttft_p95_s": quantile(ttft, 0.95),
        "latency_p50_s": quantile(total, 0.5),
        "latency_p95_s": quantile(total, 0.95),
        "feedback_count": int(counters.get("feedback_count", 0)),
        "reward_count": reward.count,
        "reward_mean": _finite(reward.mean),
        "reward_std": _finite(math.sqrt(reward.variance)) if reward.count > 1 else None,
        "thumbs_count": thumbs.count,
        "thumbs_up_rate": _finite(thumbs.mean),
        "labels": labels.get(name, {}),
        "versions": {metric.removeprefix(VERSION_PREFIX): int(count)
                     for metric, count in sorted(counters.items()) if metric.startswith(VERSION_PREFIX)},
    }


def _comparison(arm: str, control: str, metric: str, result: Comparison | None) -> dict:
    if result is None:
        return {"arm": arm, "vs": control, "metric": metric, "diff": None, "ci95": None, "p_value": None,
                "always_valid_ci95": None, "note": "needs at least two observations on each side, with some spread"}
    return {
        "arm": arm, "vs": control, "metric": metric, "diff": result.diff, "ci95": list(result.ci95),
        "p_value": result.p_value, "always_valid_ci95": list(result.always_valid_ci95),
    }


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None
