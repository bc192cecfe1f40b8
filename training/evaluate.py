"""`loraplex eval`: every adapter and the base model on every task's test file, in mixed batches.

Tasks are read into `EvalTask`s (records, tokenized examples, reference answers, the metric); one
model holds every adapter in its own slot; per task, one pass of mixed batches gives every
system's answer-token losses and one pass gives every system's greedy answers. The statistics
(metrics, intervals, paired tests) are computed from these raw outputs by training.eval_summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.peft_io import load_adapter
from adapters.routing import AdapterRouting
from adapters.weights import AdapterWeights
from backbone.generate import generate
from backbone.model import CausalLM
from backbone.sampling import SamplingParams
from training.ab_compare import detect_format
from training.data import DATA_FORMATS, DataError, Example, fit_length, has_chat_template, jsonl_records, record_spans, tokenize_spans
from training.eval_metrics import EXACT_MATCH, METRICS, MetricError, check_metric_fits
from training.mixed_scoring import BASE_SLOT, answer_losses, answer_span, clear_adapters, greedy_answers, pad_id_of, place_adapters

BASE = "base"
TASK_FILE = "task.json"  # beside a task's data: {"format": ..., "metric": ...}
ANSWER_SLACK_TOKENS = 8  # generated tokens allowed past the reference's length


@dataclass
class EvalTask:
    name: str
    path: Path
    data_format: str
    metric: str
    examples: list[Example]
    inputs: list[str]  # what the user asked, for the worst-errors list
    references: list[str]  # the expected answer text


@dataclass
class SystemInfo:
    name: str
    path: str | None  # None for the base model
    parameters: int  # the adapter's (all trainable); for the base, the frozen model's
    adapter_bytes: int  # the adapter folder's files on disk; 0 for the base
    warnings: list[str]


@dataclass
class TaskOutputs:
    task: EvalTask
    loss_sums: np.ndarray  # (N, S) summed answer-token loss, columns in system order
    loss_counts: np.ndarray  # (N, S) answer tokens
    answers: list[list[str]]  # [system][item] greedy answer text
    answer_tokens: np.ndarray  # (N, S) tokens generated


def record_input_and_answer(record: dict[str, Any], data_format: str) -> tuple[str, str]:
    """(what was asked, the expected answer) of a record: the first assistant turn for a chat."""
    if data_format == "instruction":
        extra = record.get("input") or ""
        return (f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]), record["output"]
    if data_format == "chat":
        messages = record["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        asked = next((m["content"] for m in reversed(messages[:first]) if m["role"] == "user"), "")
        return asked, messages[first]["content"]
    return record["prompt"], record["completion"]


def declared_task_settings(path: Path) -> dict[str, str]:
    """The format and metric declared in task.json beside the data file, if there is one."""
    declared = path.parent / TASK_FILE
    if not declared.is_file():
        return {}
    try:
        settings = json.loads(declared.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{declared} is not valid JSON ({err.msg}); write {{\"format\": ..., \"metric\": ...}}") from None
    if not isinstance(settings, dict):
        raise DataError(f"{declared} must hold an object like {{\"format\": \"chat\", \"metric\": \"exact_match\"}}")
    return {key: settings[key] for key in ("format", "metric") if key in settings}


def load_eval_task(
    name: str,
    path: str | Path,
    tokenizer: Any,
    *,
    metric: str | None = None,
    data_format: str | None = None,
    max_length: int = 1024,
    max_examples: int | None = None,
) -> EvalTask:
    """A task's test file, tokenized record by record (none dropped, so items stay aligned)."""
    path = Path(path)
    declared = declared_task_settings(path) if path.is_file() else {}
    data_format = data_format or declared.get("format") or detect_format(path)
    if data_format not in DATA_FORMATS:
        raise DataError(f"task {name}: unknown format {data_format!r} for {path}; use one of {', '.join(DATA_FORMATS)}")
    metric = metric or declared.get("metric") or EXACT_MATCH
    if metric not in METRICS:
        raise MetricError(f"task {name} ({path}): unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    append_eos = data_format == "prompt_completion" or not has_chat_template(tokenizer)
    task = EvalTask(name, path, data_format, metric, [], [], [])
    for number, record in jsonl_records(path):
        if max_examples is not None and len(task.examples) >= max_examples:
            break
        try:
            spans = record_spans(record, data_format, tokenizer)
        except (DataError, ValueError) as err:
            raise DataError(f"{path}:{number}: {err} (read as format {data_format!r}; declare another in {TASK_FILE})") from None
        example = fit_length(tokenize_spans(spans, tokenizer, append_eos), max_length, "truncate")
        if not any(example.loss_mask):
            raise DataError(f"{path}:{number}: the answer lies past --max-length {max_length} tokens; raise --max-length")
        asked, answer = record_input_and_answer(record, data_format)
        task.examples.append(example)
        task.inputs.append(asked)
        task.references.append(answer)
    if not task.examples:
        raise DataError(f"task {name}: {path} holds no records to evaluate on")
    check_metric_fits(metric, task.references, f"task {name} ({path})")
    return task


def load_systems(
    adapters: dict[str, Path], model: CausalLM, strict_base: bool, served_model_name: str | None
) -> tuple[list[SystemInfo], list[AdapterWeights]]:
    """The base model and each adapter, validated against the model before anything runs."""
    systems = [SystemInfo(BASE, None, sum(p.numel() for p in model.parameters()), 0, [])]
    loaded = []
    for name, path in adapters.items():
        try:
            weights = load_adapter(path, model.config, strict_base=strict_base, served_model_name=served_model_name)
        except ValueError as err:
            raise type(err)(f"adapter {name} ({path}): {err}") from None
        loaded.append(weights)
        size = sum(file.stat().st_size for file in Path(path).iterdir() if file.is_file())
        systems.append(SystemInfo(name, str(path), weights.num_params, size, list(weights.warnings)))
    return systems, loaded


def evaluate_task(
    model: CausalLM, tokenizer: Any, task: EvalTask, slots: Sequence[int], batch_tokens: int, progress: Any = None
) -> TaskOutputs:
    """Losses and greedy answers of every system (slot) on every item of the task."""
    sums, counts = answer_losses(model, task.examples, slots, batch_tokens, pad_id_of(tokenizer))
    if progress is not None:
        progress.update(1)
    spans = [answer_span(example) for example in task.examples]
    budgets = [len(reference) + ANSWER_SLACK_TOKENS for _, reference in spans]
    completions = greedy_answers(model, tokenizer, [prompt for prompt, _ in spans], budgets, slots, batch_tokens)
    if progress is not None:
        progress.update(1)
    answers = [[completions[item][column].text or "" for item in range(len(spans))] for column in range(len(slots))]
    tokens = np.array([[len(completion.token_ids) for completion in row] for row in completions], dtype=float)
    return TaskOutputs(task, sums, counts, answers, tokens)


def generation_speed(model: CausalLM, prompts: list[list[int]], slot: int, new_tokens: int) -> float:
    """Tokens per second of a batch of `prompts` all on one slot, `new_tokens` each, no early stop."""
    device = model.inv_freq.device
    routing = None if slot == BASE_SLOT else AdapterRouting(torch.full((len(prompts),), slot, device=device))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    generate(model, prompts, params, stop_token_ids=(), routing=routing)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def run_evaluation(
    model: CausalLM,
    tokenizer: Any,
    adapters: dict[str, Path],
    tasks: Sequence[EvalTask],
    *,
    batch_tokens: int = 4096,
    speed_rows: int = 8,
    speed_tokens: int = 16,
    strict_base: bool = False,
    served_model_name: str | None = None,
    progress: bool = True,
) -> tuple[list[SystemInfo], list[TaskOutputs], dict[str, float]]:
    """Raw outputs of every system on every task, and each system's generation speed (tok/s)."""
    from tqdm import tqdm

    systems, loaded = load_systems(adapters, model, strict_base, served_model_name)
    slots = [BASE_SLOT, *range(len(loaded))]
    layers = place_adapters(model, loaded)
    bar = tqdm(total=2 * len(tasks) + (len(slots) if speed_rows else 0), desc="eval", unit="pass", disable=not progress)
    try:
        outputs = []
        for task in tasks:
            bar.set_postfix_str(task.name)
            outputs.append(evaluate_task(model, tokenizer, task, slots, batch_tokens, bar))
        speeds: dict[str, float] = {}
        if speed_rows:
            prompts = [answer_span(e)[0] for task in tasks for e in task.examples][:speed_rows]
            for system, slot in zip(systems, slots):
                bar.set_postfix_str(f"speed {system.name}")
                speeds[system.name] = generation_speed(model, prompts, slot, speed_tokens)
                bar.update(1)
    finally:
        bar.close()
        clear_adapters(layers, len(loaded))
    return systems, outputs, speeds
