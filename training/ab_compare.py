"""Offline A/B comparison of two adapters on one eval set.

Both adapters sit in two slots of one model (0 = A, 1 = B) and every eval example runs three times
in the same forward call: on slot 0, on slot 1 and on the base alone (slot -1). Each row's loss is
the mean over its answer tokens, the tokens training puts its loss on, so the numbers read like the
training log's. The paired differences B - A get a bootstrap CI; the same resampled examples give
every arm's own CI, so the bars in the chart and the difference agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from adapters.peft_io import load_adapter
from adapters.weights import AdapterWeights
from backbone.atomic_folder import write_atomically
from backbone.model import CausalLM
from training.data import DATA_FORMATS, DataError, Example, jsonl_records
from training.mixed_scoring import answer_losses, answer_span, clear_adapters, greedy_answers, pad_id_of, place_adapters

ARMS = ("a", "b", "base")
ARM_SLOTS = {"a": 0, "b": 1, "base": -1}  # -1 = no adapter: the base model alone
SLOTS = [ARM_SLOTS[arm] for arm in ARMS]
REPORT_FILE = "report.json"
CHART_FILE = "comparison.png"


@dataclass
class ArmStats:
    mean_loss: float  # mean over examples of each example's mean answer-token loss
    ci95: tuple[float, float]  # bootstrap CI of mean_loss
    token_loss: float  # over all answer tokens at once (long answers weigh more)
    perplexity: float  # exp(token_loss)
    exact_match: float | None = None  # share of greedy answers equal to the reference; None = not run


@dataclass
class ComparisonReport:
    adapter_a: str
    adapter_b: str
    examples: int
    answer_tokens: int
    arms: dict[str, ArmStats]  # "a", "b", "base"
    difference: float  # mean over examples of loss_B - loss_A; < 0 = B is better
    difference_ci95: tuple[float, float]
    win_rate_b: float  # share of examples where B's loss is lower (ties count half)
    wins: dict[str, int]  # {"b": ..., "a": ..., "tie": ...}
    bootstrap: dict[str, int]  # {"resamples": ..., "seed": ...}
    losses: dict[str, list[float]]  # per-example loss of each arm, in eval order
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-example losses."""
        out = self.to_dict()
        del out["losses"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_adapters(
    model: CausalLM,
    tokenizer: Any,
    adapter_a: Path,
    adapter_b: Path,
    examples: Sequence[Example],
    *,
    batch_tokens: int = 2048,  # padded tokens per forward call, over all three arms' rows
    resamples: int = 2000,
    seed: int = 0,
    exact_match: bool = False,
    strict_base: bool = False,
    served_model_name: str | None = None,
) -> ComparisonReport:
    """Score `examples` under adapter A, adapter B and the base in mixed batches of one model.

    The model gets LoRA layers with two slots on the union of the adapters' targets (a model that
    has LoRA layers already keeps them and needs at least two slots); both slots are cleared again
    at the end."""
    if not examples:
        raise DataError("the eval set has no examples to compare on; check the file and --max-examples")
    if any(e.num_answer_tokens == 0 for e in examples):
        raise DataError("an eval example has no answer tokens; the loss is taken on answer tokens only")
    loaded = {}
    for arm, path in (("a", adapter_a), ("b", adapter_b)):
        try:
            loaded[arm] = load_adapter(path, model.config, strict_base=strict_base, served_model_name=served_model_name)
        except ValueError as err:
            raise type(err)(f"adapter {arm.upper()}: {err}") from None
    layers = place_adapters(model, [loaded["a"], loaded["b"]])
    try:
        sums, counts = answer_losses(model, examples, SLOTS, batch_tokens, pad_id_of(tokenizer))
        matches = _exact_matches(model, tokenizer, examples, batch_tokens) if exact_match else None
    finally:
        clear_adapters(layers, 2)
    losses = sums / counts  # (N, 3) per-example mean answer-token loss
    return _report(loaded, losses, sums, counts, matches, resamples, seed)


def _exact_matches(model: CausalLM, tokenizer: Any, examples: Sequence[Example], batch_tokens: int) -> np.ndarray:
    """(N, 3) 1.0 where the greedy answer, at most as long as the reference, decodes (special
    tokens skipped, whitespace stripped) to the reference's text."""
    spans = [answer_span(example) for example in examples]
    if any(not prompt for prompt, _ in spans):
        raise DataError("an eval example starts with its answer; exact match needs a prompt to generate from")
    completions = greedy_answers(
        model, tokenizer, [prompt for prompt, _ in spans], [len(reference) for _, reference in spans], SLOTS, batch_tokens
    )
    matches = np.zeros((len(examples), len(ARMS)))
    for index, (_, reference) in enumerate(spans):
        expected = tokenizer.decode(reference).strip()
        for column in range(len(ARMS)):
            matches[index, column] = float(tokenizer.decode(completions[index][column].token_ids).strip() == expected)
    return matches


def bootstrap_ci(values: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """95% percentile CI of the mean of `values` (N,) over resampled `indices` (resamples, N)."""
    means = values[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _report(
    loaded: dict[str, AdapterWeights],
    losses: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    matches: np.ndarray | None,
    resamples: int,
    seed: int,
) -> ComparisonReport:
    count = losses.shape[0]
    indices = np.random.default_rng(seed).integers(0, count, size=(resamples, count))  # shared by every statistic
    arms = {}
    for column, arm in enumerate(ARMS):
        token_loss = float(sums[:, column].sum() / counts[:, column].sum())
        arms[arm] = ArmStats(
            mean_loss=float(losses[:, column].mean()),
            ci95=bootstrap_ci(losses[:, column], indices),
            token_loss=token_loss,
            perplexity=math.exp(token_loss) if token_loss < 700 else math.inf,
            exact_match=None if matches is None else float(matches[:, column].mean()),
        )
    difference = losses[:, 1] - losses[:, 0]  # (N,) B - A
    wins_b, wins_a = int((difference < 0).sum()), int((difference > 0).sum())
    ties = count - wins_b - wins_a
    return ComparisonReport(
        adapter_a=loaded["a"].source,
        adapter_b=loaded["b"].source,
        examples=count,
        answer_tokens=int(counts[:, 0].sum()),
        arms=arms,
        difference=float(difference.mean()),
        difference_ci95=bootstrap_ci(difference, indices),
        win_rate_b=(wins_b + 0.5 * ties) / count,
        wins={"b": wins_b, "a": wins_a, "tie": ties},
        bootstrap={"resamples": resamples, "seed": seed},
        losses={arm: losses[:, column].tolist() for column, arm in enumerate(ARMS)},
        warnings=[f"adapter {arm.upper()}: {w}" for arm in ("a", "b") for w in loaded[arm].warnings],
    )


def detect_format(path: Path) -> str:
    """The data format of a JSONL file, from the fields of its first record."""
    if not path.is_file():
        raise DataError(f"eval file {path} does not exist; pass a JSONL file")
    for number, record in jsonl_records(path):
        keys = set(record) if isinstance(record, dict) else set()
        if "messages" in keys:
            return "chat"
        if "instruction" in keys:
            return "instruction"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
        raise DataError(
            f"{path}:{number}: cannot tell the format from fields {sorted(keys)}; pass --format "
            f"({', '.join(DATA_FORMATS)})"
        )
    raise DataError(f"eval file {path} holds no records")


def write_outputs(report: ComparisonReport, folder: Path) -> list[Path]:
    """report.json and the chart in `folder`, each written to a temporary file and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    report_path = folder / REPORT_FILE
    write_atomically(report_path, lambda staging: staging.write_text(json.dumps(report.to_dict(), indent=2) + "\n"))
    chart_path = folder / CHART_FILE
    write_atomically(chart_path, lambda staging: _draw_chart(report, staging))
    return [report_path, chart_path]


def _draw_chart(report: ComparisonReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(10, 4))
    names = {"a": "A", "b": "B", "base": "base"}
    means = [report.arms[arm].mean_loss for arm in ARMS]
    errors = np.array([[m - report.arms[arm].ci95[0], report.arms[arm].ci95[1] - m] for arm, m in zip(ARMS, means)]).T
    bars.bar([names[arm] for arm in ARMS], means, yerr=errors, capsize=6, color=["tab:blue", "tab:orange", "tab:gray"])
    bars.set_ylabel("mean answer-token loss")
    low, high = report.difference_ci95
    bars.set_title(f"B - A = {report.difference:+.4f} [{low:+.4f}, {high:+.4f}], n={report.examples}", fontsize=9)

    loss_a, loss_b = np.array(report.losses["a"]), np.array(report.losses["b"])
    scatter.scatter(loss_a, loss_b, s=12, alpha=0.7)
    edge = [min(loss_a.min(), loss_b.min()), max(loss_a.max(), loss_b.max())]
    scatter.plot(edge, edge, "k--", linewidth=1)  # below the line: B has the lower loss
    scatter.set_xlabel("loss under A")
    scatter.set_ylabel("loss under B")
    scatter.set_title(f"per example (B wins {report.win_rate_b:.0%})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)
