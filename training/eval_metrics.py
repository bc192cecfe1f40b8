"""Task metrics with bootstrap intervals and paired tests on the same items.

Every metric is written as per-item sufficient statistics (N, K) plus a function that turns their
column sums into the metric's value. A mean (exact match, accuracy, ROUGE-L) has K = 2 (value,
1); corpus metrics (chrF, BLEU, macro-F1) are not means of per-item scores, so their items carry
n-gram or confusion counts instead. Resampling items then means summing resampled rows, and one
bootstrap code path serves every metric: the same resampled items give each system's interval and
the paired difference between two systems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

EXACT_MATCH = "exact_match"
LABEL_METRICS = ("accuracy", "macro_f1", "precision", "recall")  # one label per answer
TEXT_METRICS = ("chrf", "bleu", "rouge_l")
METRICS = (EXACT_MATCH, *LABEL_METRICS, *TEXT_METRICS)
BINARY_METRICS = (EXACT_MATCH, "accuracy")  # per-item right/wrong: McNemar applies


class MetricError(ValueError):
    """A metric that does not exist or does not fit the task's data."""


@dataclass
class ItemStats:
    """Per-item statistics of one system on one task and how to score a sum of them."""

    stats: np.ndarray  # (N, K)
    score: Callable[[np.ndarray], float]  # (K,) column sums of any subset of items -> metric value

    def value(self) -> float:
        return self.score(self.stats.sum(axis=0))

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        """(R,) the metric on each resample of items `indices` (R, N)."""
        sums = self.stats[indices].sum(axis=1)  # (R, K)
        return np.array([self.score(row) for row in sums])


def normalize_answer(text: str) -> str:
    """What exact match compares: the answer with outer whitespace removed."""
    return text.strip()


def mean_stats(values: Sequence[float]) -> ItemStats:
    values = np.asarray(values, dtype=float)
    stats = np.stack([values, np.ones_like(values)], axis=1)
    return ItemStats(stats, lambda sums: float(sums[0] / sums[1]))


def exact_match_items(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(N,) 1.0 where the prediction equals the reference, outer whitespace ignored."""
    return np.array([float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)])


def label_stats(predictions: Sequence[str], references: Sequence[str], metric: str) -> ItemStats:
    """Accuracy, macro precision, macro recall or macro-F1 over the reference labels. A prediction
    outside the label set is wrong for every label: a miss for its item's label, a false alarm for none."""
    labels = sorted({normalize_answer(r) for r in references})
    predicted = [normalize_answer(p) for p in predictions]
    truth = [normalize_answer(r) for r in references]
    count = len(labels)
    # Per item: [correct, true-positive per label, predicted-as per label, truly per label].
    stats = np.zeros((len(truth), 1 + 3 * count))
    for row, (p, t) in enumerate(zip(predicted, truth)):
        stats[row, 0] = float(p == t)
        for column, label in enumerate(labels):
            stats[row, 1 + column] = float(p == label and t == label)
            stats[row, 1 + count + column] = float(p == label)
            stats[row, 1 + 2 * count + column] = float(t == label)
    items = len(truth)

    def score(sums: np.ndarray) -> float:
        if metric == "accuracy":
            return float(sums[0] / items)
        tp, predicted_as, truly = sums[1 : 1 + count], sums[1 + count : 1 + 2 * count], sums[1 + 2 * count :]
        present = truly > 0  # a label missing from a resample has no recall to average
        precision = np.divide(tp, predicted_as, out=np.zeros_like(tp), where=predicted_as > 0)
        recall = np.divide(tp, truly, out=np.zeros_like(tp), where=truly > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
        chosen = {"precision": precision, "recall": recall, "macro_f1": f1}[metric]
        return float(chosen[present].mean()) if present.any() else 0.0

    return ItemStats(stats, score)


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    return label_stats(predictions, references, "macro_f1").value()


def chrf_stats(predictions: Sequence[str], references: Sequence[str]) -> ItemStats:
    """sacrebleu's chrF (character 6-grams, beta 2) from per-sentence statistics, as a rate in [0, 1]."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    stats = np.array(metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=float)
    return ItemStats(stats, lambda sums: metric._compute_score_from_stats(list(sums)).score / 100.0)


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> ItemStats:
    """sacrebleu's corpus BLEU (13a tokenizer, exponential smoothing), as a rate in [0, 1]."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    stats = np.array(metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=float)
    return ItemStats(stats, lambda sums: metric._compute_score_from_stats(list(sums)).score / 100.0)


def rouge_l_items(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(N,) ROUGE-L F-measure of each prediction (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def metric_stats(metric: str, predictions: Sequence[str], references: Sequence[str]) -> ItemStats:
    if metric == EXACT_MATCH:
        return mean_stats(exact_match_items(predictions, references))
    if metric in LABEL_METRICS:
        return label_stats(predictions, references, metric)
    if metric == "chrf":
        return chrf_stats(predictions, references)
    if metric == "bleu":
        return bleu_stats(predictions, references)
    if metric == "rouge_l":
        return mean_stats(rouge_l_items(predictions, references))
    raise MetricError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def check_metric_fits(metric: str, references: Sequence[str], where: str) -> None:
    """Label metrics need answers drawn from a small label set; free text gets a clear error."""
    if metric not in METRICS:
        raise MetricError(f"{where}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric in LABEL_METRICS:
        distinct = len({normalize_answer(r) for r in references})
        if distinct > max(1, len(references) // 2):  # labels repeat; free-text answers hardly do
            raise MetricError(
                f"{where}: metric {metric!r} needs answers from a small label set, but the {len(references)} "
                f"answers hold {distinct} distinct texts (free text); use chrf, rouge_l or exact_match for this task"
            )


def resample_indices(items: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) item indices drawn with replacement; shared by every statistic of one task."""
    return np.random.default_rng(seed).integers(0, items, size=(resamples, items))


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_ci(stats: ItemStats, indices: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the metric over the resamples."""
    return percentile_ci(stats.resampled(indices))


@dataclass
class PairedResult:
    diff: float  # metric(B) - metric(A) on the same items
    ci95: tuple[float, float]
    p_value: float  # two-sided
    test: str  # "mcnemar" (exact, binary per-item metrics) or "paired_bootstrap"
    bootstrap_p_value: float


def paired_bootstrap_p(observed: float, resampled_diffs: np.ndarray) -> float:
    """Two-sided p-value of a zero difference: how often a resampled difference, centred on the
    observed one (the null shifted to zero), lies at least as far from zero as the observation."""
    if observed == 0:
        return 1.0
    centred = resampled_diffs - observed
    return float(min(1.0, (np.abs(centred) >= abs(observed)).mean()))


def mcnemar_p(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Exact (binomial) two-sided McNemar p-value on paired right/wrong items."""
    a_only = int(((a_correct > 0.5) & (b_correct < 0.5)).sum())
    b_only = int(((a_correct < 0.5) & (b_correct > 0.5)).sum())
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1)) / 2.0**discordant
    return float(min(1.0, 2.0 * tail))


def paired_test(metric: str, a: ItemStats, b: ItemStats, indices: np.ndarray) -> PairedResult:
    """B against A on the same items: the difference, its bootstrap interval and a p-value."""
    diff = b.value() - a.value()
    resampled = b.resampled(indices) - a.resampled(indices)
    bootstrap_p = paired_bootstrap_p(diff, resampled)
    if metric in BINARY_METRICS:
        p_value, test = mcnemar_p(a.stats[:, 0], b.stats[:, 0]), "mcnemar"
    else:
        p_value, test = bootstrap_p, "paired_bootstrap"
    return PairedResult(float(diff), percentile_ci(resampled), p_value, test, bootstrap_p)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (whitespace words); 0 when there are none."""
    grams = [tuple(words[i : i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
