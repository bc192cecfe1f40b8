"""Training runs for the dashboard: each folder under `--runs-dir` that holds a `log.jsonl` (as
`loraplex train` writes it), read into loss curves and eval figures.

Logs are read on each request (runs in progress keep growing), and long curves are thinned to
at most `MAX_POINTS` points so the page stays light; the last point is always kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_POINTS = 400
MAX_RUNS = 100  # newest first; an operator's runs folder can hold years of runs


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """The newest runs under `runs_dir` (by log modification time), each summarised."""
    logs = [path for path in runs_dir.glob("*/log.jsonl") if path.is_file()]
    logs.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    return [read_run(path.parent) for path in logs[:MAX_RUNS]]


def read_run(folder: Path) -> dict[str, Any]:
    records, bad_lines = _records(folder / "log.jsonl")
    tasks: list[str] = []
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for record in records:
        kind = record.get("kind")
        if kind == "setup" and isinstance(record.get("tasks"), list):
            tasks = [str(task) for task in record["tasks"]]
        elif kind == "train" and isinstance(record.get("step"), int):
            train.append({
                "step": record["step"],
                "loss": _number(record.get("loss")),
                "task_loss": [_number(value) for value in record.get("task_loss") or []],
            })
        elif kind == "eval" and isinstance(record.get("step"), int) and isinstance(record.get("tasks"), dict):
            evals.append({
                "step": record["step"],
                "mean_loss": _number(record.get("mean_loss")),
                "tasks": {
                    str(name): {"loss": _number(figures.get("loss")), "perplexity": _number(figures.get("perplexity"))}
                    for name, figures in record["tasks"].items() if isinstance(figures, dict)
                },
            })
    summary_path = folder / "summary.json"
    return {
        "name": folder.name,
        "tasks": tasks,
        "steps": train[-1]["step"] if train else 0,
        "finished": summary_path.is_file(),
        "updated": (folder / "log.jsonl").stat().st_mtime,
        "train": _thin(train),
        "eval": _thin(evals),
        "bad_lines": bad_lines,
    }


def _records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The log's records; a line being written right now (or damaged) is counted, not fatal."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _number(value: Any) -> float | None:
    """JSON numbers only; NaN and infinities (a diverged run) become None so the page gets valid JSON."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _thin(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = -(-len(points) // MAX_POINTS)
    thinned = points[::stride]
    if thinned[-1] is not points[-1]:
        thinned.append(points[-1])
    return thinned
