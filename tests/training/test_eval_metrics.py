"""Eval metrics against known values and reference implementations, and the statistics against
simulation: interval coverage, and paired tests that find a planted difference and reject A/A at
about alpha."""

import math

import numpy as np
import pytest
import sacrebleu

from training.eval_metrics import (
    MetricError,
    bootstrap_ci,
    check_metric_fits,
    distinct_n,
    exact_match_items,
    label_stats,
    macro_f1,
    mcnemar_p,
    mean_stats,
    metric_stats,
    paired_test,
    resample_indices,
)

HYPOTHESES = ["the cat sat on the mat", "a quick brown fox jumps", "hello world", "it is raining today in paris"]
REFERENCES = ["the cat is on the mat", "the quick brown fox jumped", "hello there world", "today it rains in paris"]


def test_chrf_and_bleu_equal_sacrebleu_corpus_scores():
    assert metric_stats("chrf", HYPOTHESES, REFERENCES).value() == pytest.approx(
        sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score / 100, abs=1e-9)
    assert metric_stats("bleu", HYPOTHESES, REFERENCES).value() == pytest.approx(
        sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score / 100, abs=1e-9)


def test_a_resample_of_items_scores_like_the_corpus_of_those_items():
    # Summed per-item statistics must give the corpus score of the resampled corpus itself.
    picked = [2, 0, 0, 3]
    stats = metric_stats("chrf", HYPOTHESES, REFERENCES)
    resampled = stats.resampled(np.array([picked]))[0]
    expected = sacrebleu.corpus_chrf([HYPOTHESES[i] for i in picked], [[REFERENCES[i] for i in picked]]).score / 100
    assert resampled == pytest.approx(expected, abs=1e-9)


def test_rouge_l_on_a_hand_computed_pair():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is 5 words of 6 on each side.
    value = metric_stats("rouge_l", ["the cat sat on the mat"], ["the cat is on the mat"]).value()
    assert value == pytest.approx(5 / 6)


def test_label_metrics_on_a_fixed_confusion():
    references = ["a", "a", "a", "b", "b", "c"]
    predictions = ["a", "a", "b", "b", "c", "c"]
    # a: P 2/2, R 2/3, F1 0.8; b: P 1/2, R 1/2, F1 0.5; c: P 1/2, R 1/1, F1 2/3.
    assert macro_f1(predictions, references) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert label_stats(predictions, references, "accuracy").value() == pytest.approx(4 / 6)
    assert label_stats(predictions, references, "precision").value() == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert label_stats(predictions, references, "recall").value() == pytest.approx((2 / 3 + 0.5 + 1) / 3)


def test_a_prediction_outside_the_label_set_is_wrong_everywhere():
    assert macro_f1(["a", "banana"], ["a", "b"]) == pytest.approx((1.0 + 0.0) / 2)


def test_exact_match_ignores_outer_whitespace_only():
    assert exact_match_items([" 2021-03-05\n", "2021-3-5", "Tokyo"], ["2021-03-05", "2021-03-05", "tokyo"]).tolist() == [1, 0, 0]


def test_mcnemar_exact_on_hand_computed_counts():
    # 10 items only A gets right, 2 only B: p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 158 / 4096.
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3, dtype=float)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3, dtype=float)
    assert mcnemar_p(a, b) == pytest.approx(158 / 4096)
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p(np.array([1.0] * 6), np.array([0.0] * 6)) == pytest.approx(2 / 64)


def test_distinct_n_on_known_texts():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab, ba, ab | ab, bc
    assert distinct_n(["x"], 2) == 0.0


def test_label_metric_on_free_text_is_refused():
    with pytest.raises(MetricError, match="chrf, rouge_l or exact_match"):
        check_metric_fits("macro_f1", [f"sentence number {i}" for i in range(20)], "task t (t.jsonl)")
    check_metric_fits("macro_f1", ["yes", "no"] * 10, "task t")
    with pytest.raises(MetricError, match="unknown metric"):
        check_metric_fits("f2", ["yes"], "task t")


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    trials, covered, true_rate = 300, 0, 0.3
    for trial in range(trials):
        values = (rng.random(100) < true_rate).astype(float)
        low, high = bootstrap_ci(mean_stats(values), resample_indices(100, 500, trial))
        covered += low <= true_rate <= high
    assert 0.90 <= covered / trials <= 0.99


def test_paired_test_finds_a_planted_difference():
    rng = np.random.default_rng(2)
    base = (rng.random(80) < 0.2).astype(float)
    better = np.where(rng.random(80) < 0.6, 1.0, base)  # B fixes most of A's misses
    result = paired_test("exact_match", mean_stats(base), mean_stats(better), resample_indices(80, 1000, 0))
    assert result.diff > 0.3 and result.ci95[0] > 0
    assert result.test == "mcnemar" and result.p_value < 1e-4 and result.bootstrap_p_value < 0.01
    continuous = paired_test("rouge_l", mean_stats(rng.random(80)), mean_stats(rng.random(80) + 0.3), resample_indices(80, 1000, 0))
    assert continuous.test == "paired_bootstrap" and continuous.p_value < 0.01 and continuous.ci95[0] > 0


@pytest.mark.parametrize("metric", ["exact_match", "rouge_l"])
def test_paired_test_on_a_a_data_rejects_at_about_alpha(metric):
    rng = np.random.default_rng(3)
    trials, rejected = 300, 0
    for trial in range(trials):
        if metric == "exact_match":
            a, b = (rng.random(60) < 0.5).astype(float), (rng.random(60) < 0.5).astype(float)
        else:
            a, b = rng.random(60), rng.random(60)
        result = paired_test(metric, mean_stats(a), mean_stats(b), resample_indices(60, 400, trial))
        rejected += result.p_value < 0.05
    # Exact McNemar is conservative (discrete), the bootstrap near nominal: both well below 2 alpha.
    assert 0.01 <= rejected / trials <= 0.09


def test_the_interval_of_a_sure_thing_has_no_width():
    low, high = bootstrap_ci(mean_stats(np.ones(10)), resample_indices(10, 100, 0))
    assert low == high == 1.0
    assert not math.isnan(metric_stats("macro_f1", ["x"] * 4, ["x"] * 4).value())
