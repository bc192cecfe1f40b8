"""The eval report on disk: report.json, report.md (tables) and PNG charts, each written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from backbone.atomic_folder import write_atomically
from training.evaluate import BASE

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ANSWERS = "answers.jsonl"  # every system's answer to every item
METRIC_CHART = "metrics.png"
MATRIX_CHART = "matrix.png"


def _interval(entry: dict[str, Any], digits: int = 3) -> str:
    low, high = entry["ci95"]
    return f"{entry['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _diff(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    mark = " *" if entry["significant"] else ""
    return f"{entry['diff']:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def render_markdown(report: dict[str, Any]) -> str:
    bootstrap = report["bootstrap"]
    lines = [
        f"# Evaluation of {report['model']}",
        "",
        f"Values are rates in [0, 1] with 95% bootstrap intervals ({bootstrap['resamples']} resamples, seed "
        f"{bootstrap['seed']}). Differences are against the base model on the same items; * marks p < "
        f"{bootstrap['alpha']} with an interval that excludes 0 (McNemar for exact match and accuracy, paired "
        "bootstrap otherwise). Loss is the mean answer-token loss (lower is better).",
        "",
        "## Each task",
        "",
    ]
    for name, task in report["tasks"].items():
        lines += [f"### {name} ({task['metric']}, {task['items']} items, `{task['file']}`)", "",
                  f"| system | {task['metric']} | vs base | p | loss | distinct-1 / 2 |", "|---|---|---|---|---|---|"]
        for system, entry in task["systems"].items():
            paired = task["paired"].get(system)
            versus, p_value = (_diff(paired), f"{paired['p_value']:.2g}") if paired else ("", "")
            lines.append(
                f"| {system} | {_interval(entry)} | {versus} | {p_value} | {_interval(entry['loss'], 2)} | "
                f"{entry['distinct_1']:.2f} / {entry['distinct_2']:.2f} |"
            )
        if task["paired_adapters"]:
            lines += ["", "| adapter vs adapter | diff | p |", "|---|---|---|"]
            lines += [f"| {pair} | {_diff(entry)} | {entry['p_value']:.2g} |" for pair, entry in task["paired_adapters"].items()]
        lines.append("")
    lines += _forgetting_lines(report) + _system_lines(report) + _error_lines(report)
    return "\n".join(lines) + "\n"


def _forgetting_lines(report: dict[str, Any]) -> list[str]:
    if not report["forgetting"]:
        return []
    lines = ["## Off-task: each adapter on the other tasks, against the base", "",
             "| adapter | task | base | adapter | diff | hurts |", "|---|---|---|---|---|---|"]
    for adapter, view in report["forgetting"].items():
        for task, row in view["off_task"].items():
            lines.append(
                f"| {adapter} | {task} | {row['base']:.3f} | {row['adapter']:.3f} | {row['diff']:+.3f} "
                f"[{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}] | {'yes' if row['hurts'] else 'no'} |"
            )
    return lines + [""]


def _system_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Systems", "", "| system | trainable parameters | share of base | adapter bytes | generation tok/s |",
             "|---|---|---|---|---|"]
    for name, row in report["systems"].items():
        speed = f"{row['tokens_per_second']:.1f}" if row.get("tokens_per_second") else "-"
        if name == BASE:
            lines.append(f"| {name} | {row['parameters']:,} (frozen) | - | - | {speed} |")
        else:
            lines.append(
                f"| {name} | {row['trainable_parameters']:,} | {row['trainable_share']:.4%} | {row['adapter_bytes']:,} | {speed} |"
            )
    return lines + [""]


def _error_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Worst errors (highest loss on the expected answer)", ""]
    for name, task in report["tasks"].items():
        rows = [(system, error) for system, errors in task["worst_errors"].items() for error in errors]
        if not rows:
            continue
        lines += [f"### {name}", "", "| system | input | expected | got |", "|---|---|---|---|"]
        lines += [f"| {system} | {_cell(e['input'])} | {_cell(e['expected'])} | {_cell(e['got'])} |" for system, e in rows]
        lines.append("")
    return lines


def draw_metric_chart(report: dict[str, Any], path: Path) -> None:
    """One panel per task: each system's metric with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"].items())
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.6), squeeze=False)
    for axis, (name, task) in zip(axes[0], tasks):
        systems = list(task["systems"])
        values = np.array([task["systems"][s]["value"] for s in systems])
        intervals = np.array([task["systems"][s]["ci95"] for s in systems])
        errors = np.clip(np.stack([values - intervals[:, 0], intervals[:, 1] - values]), 0, None)
        colors = ["tab:gray" if s == BASE else ("tab:green" if s == name else "tab:blue") for s in systems]
        axis.bar(range(len(systems)), values, yerr=errors, capsize=4, color=colors)
        axis.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{name}: {task['metric']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)


def draw_matrix_chart(report: dict[str, Any], path: Path) -> None:
    """Task x system heat map of the metric value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    systems = list(report["systems"])
    matrix = np.array([[report["tasks"][t]["systems"][s]["value"] for s in systems] for t in tasks])
    figure, axis = plt.subplots(figsize=(1.3 * len(systems) + 2, 0.7 * len(tasks) + 1.5))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(tasks)), [f"{t} ({report['tasks'][t]['metric']})" for t in tasks], fontsize=8)
    for row in range(len(tasks)):
        for column in range(len(systems)):
            value = matrix[row, column]
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title("task x system", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)


def write_report(report: dict[str, Any], folder: Path, answers: list[dict[str, Any]] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in answers or [])
    writers = {
        REPORT_JSON: lambda staging: staging.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"),
        REPORT_MD: lambda staging: staging.write_text(render_markdown(report), encoding="utf-8"),
        METRIC_CHART: lambda staging: draw_metric_chart(report, staging),
        MATRIX_CHART: lambda staging: draw_matrix_chart(report, staging),
        **({ANSWERS: lambda staging: staging.write_text(lines, encoding="utf-8")} if answers is not None else {}),
    }
    paths = []
    for name, write in writers.items():
        write_atomically(folder / name, write)
        paths.append(folder / name)
    return paths
