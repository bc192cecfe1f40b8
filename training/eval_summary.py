"""Raw eval outputs -> the report: per task and system the metric and answer-token loss with 95%
bootstrap intervals, paired tests (each adapter against the base, each pair of adapters), the
off-task (forgetting) view, diversity, size, speed and the worst errors.

Within one task every statistic uses the same resampled items, so the intervals of two systems and
the interval of their difference agree with each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.eval_metrics import (
    LABEL_METRICS,
    PairedResult,
    bootstrap_ci,
    distinct_n,
    mean_stats,
    metric_stats,
    normalize_answer,
    paired_test,
    resample_indices,
)
from training.evaluate import BASE, SystemInfo, TaskOutputs

WORST_ERRORS = 3  # per system and task
ALPHA = 0.05


def _paired_dict(result: PairedResult, versus: str) -> dict[str, Any]:
    return {
        "vs": versus,
        "diff": result.diff,
        "ci95": list(result.ci95),
        "p_value": result.p_value,
        "test": result.test,
        "bootstrap_p_value": result.bootstrap_p_value,
        "significant": result.p_value < ALPHA and (result.ci95[0] > 0 or result.ci95[1] < 0),
    }


def summarize_task(outputs: TaskOutputs, names: Sequence[str], resamples: int, seed: int) -> dict[str, Any]:
    task = outputs.task
    items = len(task.examples)
    indices = resample_indices(items, resamples, seed)
    references = task.references
    stats = {name: metric_stats(task.metric, outputs.answers[column], references) for column, name in enumerate(names)}
    losses = outputs.loss_sums / outputs.loss_counts  # (N, S) per-item mean answer-token loss
    systems: dict[str, Any] = {}
    for column, name in enumerate(names):
        loss = mean_stats(losses[:, column])
        token_loss = float(outputs.loss_sums[:, column].sum() / outputs.loss_counts[:, column].sum())
        answers = outputs.answers[column]
        entry: dict[str, Any] = {
            "value": stats[name].value(),
            "ci95": list(bootstrap_ci(stats[name], indices)),
            "loss": {"value": loss.value(), "ci95": list(bootstrap_ci(loss, indices))},
            "token_loss": token_loss,
            "perplexity": math.exp(token_loss) if token_loss < 700 else None,  # None: overflow, kept JSON-valid
            "distinct_1": distinct_n(answers, 1),
            "distinct_2": distinct_n(answers, 2),
            "mean_answer_tokens": float(outputs.answer_tokens[:, column].mean()),
        }
        if task.metric in LABEL_METRICS:
            entry["labels"] = {
                label_metric: metric_stats(label_metric, answers, references).value() for label_metric in LABEL_METRICS
            }
        systems[name] = entry
    adapters = [name for name in names if name != BASE]
    paired = {name: _paired_dict(paired_test(task.metric, stats[BASE], stats[name], indices), BASE) for name in adapters}
    paired_loss = {
        name: _paired_dict(paired_test("loss", mean_stats(losses[:, 0]), mean_stats(losses[:, column]), indices), BASE)
        for column, name in enumerate(names) if name != BASE
    }
    paired_adapters = {
        f"{second} vs {first}": {
            **_paired_dict(paired_test(task.metric, stats[first], stats[second], indices), first),
            "system": second,
        }
        for position, first in enumerate(adapters) for second in adapters[position + 1 :]
    }
    return {
        "metric": task.metric,
        "items": items,
        "file": str(task.path),
        "format": task.data_format,
        "systems": systems,
        "paired": paired,
        "paired_loss": paired_loss,
        "paired_adapters": paired_adapters,
        "worst_errors": _worst_errors(outputs, names, losses),
    }


def _worst_errors(outputs: TaskOutputs, names: Sequence[str], losses: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """Per system, the wrong answers on which the expected answer was least likely (highest loss)."""
    task = outputs.task
    worst: dict[str, list[dict[str, Any]]] = {}
    for column, name in enumerate(names):
        wrong = [
            index for index, answer in enumerate(outputs.answers[column])
            if normalize_answer(answer) != normalize_answer(task.references[index])
        ]
        wrong.sort(key=lambda index: -losses[index, column])
        worst[name] = [
            {"input": task.inputs[index], "expected": task.references[index], "got": outputs.answers[column][index],
             "loss": float(losses[index, column])}
            for index in wrong[:WORST_ERRORS]
        ]
    return worst


def answer_rows(outputs: Sequence[TaskOutputs], names: Sequence[str]) -> list[dict[str, Any]]:
    """Every system's answer to every item, with the reference and the answer-token loss."""
    rows = []
    for output in outputs:
        task = output.task
        for item in range(len(task.examples)):
            for column, name in enumerate(names):
                rows.append({
                    "task": task.name, "item": item, "system": name, "input": task.inputs[item],
                    "expected": task.references[item], "got": output.answers[column][item],
                    "loss": float(output.loss_sums[item, column] / output.loss_counts[item, column]),
                })
    return rows


def own_task_of(adapter: str, task_names: Sequence[str]) -> str | None:
    """An adapter's own task is the task of the same name (the demo layout's contract)."""
    return adapter if adapter in task_names else None


def forgetting(tasks: dict[str, Any], adapters: Sequence[str]) -> dict[str, Any]:
    """Each adapter on the tasks that are not its own, against the base: does it hurt off-task?"""
    view: dict[str, Any] = {}
    for adapter in adapters:
        own = own_task_of(adapter, list(tasks))
        rows = {}
        for name, task in tasks.items():
            if name == own:
                continue
            paired = task["paired"][adapter]
            rows[name] = {
                "metric": task["metric"],
                "base": task["systems"][BASE]["value"],
                "adapter": task["systems"][adapter]["value"],
                "diff": paired["diff"],
                "ci95": paired["ci95"],
                "p_value": paired["p_value"],
                "hurts": paired["significant"] and paired["diff"] < 0,
            }
        view[adapter] = {"own_task": own, "off_task": rows}
    return view


def build_report(
    systems: Sequence[SystemInfo],
    outputs: Sequence[TaskOutputs],
    speeds: dict[str, float],
    *,
    model_name: str,
    resamples: int,
    seed: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    names = [system.name for system in systems]
    tasks = {output.task.name: summarize_task(output, names, resamples, seed) for output in outputs}
    base_parameters = systems[0].parameters
    system_rows: dict[str, Any] = {}
    for system in systems:
        row: dict[str, Any] = {"path": system.path, "tokens_per_second": speeds.get(system.name)}
        if system.name == BASE:
            row["parameters"] = base_parameters
        else:
            row.update({
                "own_task": own_task_of(system.name, list(tasks)),
                "trainable_parameters": system.parameters,
                "trainable_share": system.parameters / base_parameters,
                "adapter_bytes": system.adapter_bytes,
                "speed_vs_base": (speeds[system.name] / speeds[BASE]) if system.name in speeds and speeds.get(BASE) else None,
            })
            if system.warnings:
                row["warnings"] = system.warnings
        system_rows[system.name] = row
    adapters = [name for name in names if name != BASE]
    return {
        "model": model_name,
        "tasks": tasks,
        "systems": system_rows,
        "forgetting": forgetting(tasks, adapters),
        "bootstrap": {"resamples": resamples, "seed": seed, "alpha": ALPHA},
        "settings": settings,
    }
