"""The end-of-run evaluation of `loraplex train` (config `eval.metrics`): the run's final adapters
and the base model on each named task's eval file, reported as `loraplex eval` reports."""

from __future__ import annotations

from pathlib import Path

from backbone.model_source import load_pretrained, served_model_name
from training.config import TrainConfig
from training.eval_report import REPORT_JSON, write_report
from training.eval_summary import answer_rows, build_report
from training.evaluate import load_eval_task, run_evaluation


def run_adapters(config: TrainConfig, folder: Path) -> dict[str, Path]:
    """Each trained task's servable adapter in an exported folder: with a shared adapter, the
    standalone one (task + shared), which is what the task's rows trained through."""
    trained = [task.name for task in config.tasks if not task.adapter.frozen]
    if config.shared is not None:
        return {name: folder / "standalone" / name for name in trained}
    return {name: folder / name for name in trained}


def evaluate_run(config: TrainConfig, adapters_folder: Path, out: Path, resamples: int = 1000, seed: int = 0) -> Path:
    """Evaluate and write the report into `out`; return the report.json path."""
    model, tokenizer = load_pretrained(config.model)  # a fresh model: the trainer's holds its training slots
    tasks = [
        load_eval_task(task.name, task.eval, tokenizer, metric=config.eval.metrics[task.name], data_format=task.format,
                       max_length=config.data.max_length, max_examples=config.eval.max_examples)
        for task in config.tasks if task.name in (config.eval.metrics or {})
    ]
    systems, outputs, speeds = run_evaluation(
        model, tokenizer, run_adapters(config, adapters_folder), tasks, progress=config.progress,
        served_model_name=served_model_name(config.model),
    )
    report = build_report(
        systems, outputs, speeds, model_name=served_model_name(config.model), resamples=resamples, seed=seed,
        settings={"device": "cpu", "dtype": "float32", "split": "eval", "max_examples": config.eval.max_examples},
    )
    write_report(report, out, answer_rows(outputs, [system.name for system in systems]))
    return out / REPORT_JSON
