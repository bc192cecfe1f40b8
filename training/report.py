"""What a run reports: one JSON line per step and per evaluation (`log.jsonl`), and PNG plots
of the log at the end (loss per task, LR, gradient norm, gradient conflicts)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLog:
    """Appends JSON records to `log.jsonl`; on resume, drops records after the checkpoint's step
    so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            staging = path.with_name(path.name + ".tmp")
            staging.write_text("".join(line + "\n" for line in kept))
            os.replace(staging, path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_plots(log_path: Path, folder: Path, task_names: list[str]) -> list[Path]:
    """PNG plots of the run's log; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(figure, name: str) -> None:
        path = folder / name
        figure.tight_layout()
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)

    figure, axis = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(task_names):
        points = [(r["step"], r["task_loss"][index]) for r in steps if r["task_loss"][index] is not None]
        if points:
            axis.plot(*zip(*points), ".-", label=f"{name} train", linewidth=1)
        eval_points = [(r["step"], r["tasks"][name]["loss"]) for r in evals if name in r["tasks"]]
        if eval_points:
            axis.plot(*zip(*eval_points), "o--", label=f"{name} eval")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend(fontsize=7)
    save(figure, "loss.png")

    for key, name, label in (("lr", "lr.png", "learning rate"), ("grad_norm", "grad_norm.png", "gradient norm (before clipping)")):
        figure, axis = plt.subplots(figsize=(7, 3))
        axis.plot([r["step"] for r in steps], [r[key] for r in steps])
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        save(figure, name)

    conflicts = [(r["step"], r["conflict_rate"]) for r in steps if r.get("conflict_rate") is not None]
    if conflicts:
        figure, axis = plt.subplots(figsize=(7, 3))
        axis.plot(*zip(*conflicts))
        axis.set_xlabel("step")
        axis.set_ylabel("shared-adapter conflict rate")
        save(figure, "conflicts.png")
    return written


def _step_of(line: str) -> float:
    """A log line's step; a line a crash cut short counts as past any resume point (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")
