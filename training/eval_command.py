"""`loraplex eval`: task metrics of adapters against the base model, with intervals and paired tests."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from backbone.precision import add_precision_args
from training.data import DATA_FORMATS
from training.eval_metrics import METRICS

log = logging.getLogger(__name__)

EVAL_HELP = """\
Every adapter and the base model answer every task's test file, mixed in the same batches (one
model, one slot per adapter). Per task: the task's metric (exact_match, accuracy, macro_f1,
precision, recall, chrf, bleu, rouge_l; rates in [0, 1]) and the answer-token loss, each with a 95%
bootstrap interval; each adapter against the base and against each other adapter on the same items
(McNemar for exact match and accuracy, paired bootstrap otherwise); each adapter on the other
tasks (off-task: does it hurt?); distinct-1/2 of the answers; parameter share, adapter bytes and
generation tok/s per system; the worst errors per task.

A task's metric and format come from --metric/--format, else from task.json beside its file
({"format": "chat", "metric": "exact_match"}), else exact match and the format the first record shows.

Writes <out>/report.json, report.md, metrics.png, matrix.png and answers.jsonl (every answer).

examples:
  loraplex eval --model default --adapters examples/adapters --suite examples/tasks --out runs/eval
  loraplex eval --model default --adapter dates=runs/demo/last/standalone/dates \\
      --data dates=examples/tasks/dates/test.jsonl --metric dates=exact_match
"""


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="task metrics of adapters vs the base model, with intervals and paired tests",
        description="Evaluate LoRA adapters and the base model on task test files; write report.json, report.md and charts.",
        epilog=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default", help="base model: `default`, a model folder or a .gguf file")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter (PEFT folder); repeatable")
    parser.add_argument("--adapters", metavar="DIR", default=None, help="every adapter folder in DIR, named by its folder")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=FILE", help="a task's test file (JSONL); repeatable")
    parser.add_argument("--suite", metavar="DIR", default=None, help="every DIR/<task>/<split>.jsonl, named by its folder")
    parser.add_argument("--split", default="test", help="the split --suite reads (default: %(default)s)")
    parser.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC", help=f"a task's metric: {', '.join(METRICS)}")
    parser.add_argument("--format", action="append", default=[], metavar="TASK=FORMAT", help=f"a task's format: {', '.join(DATA_FORMATS)}")
    parser.add_argument("--out", default="eval_report", metavar="DIR", help="folder for the report (default: %(default)s)")
    add_scoring_args(parser, batch_tokens=4096, resamples=1000)
    parser.add_argument("--speed-rows", type=int, default=8, metavar="N", help="rows of the tok/s probe per system; 0 = skip (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_precision_args(parser)
    parser.set_defaults(run=run_eval)


def add_scoring_args(parser: argparse.ArgumentParser, *, batch_tokens: int, resamples: int) -> None:
    """The options `eval` and `compare` share: how much data, how it is batched, the bootstrap."""
    parser.add_argument("--max-examples", type=int, default=None, metavar="N", help="use the first N examples of each file only")
    parser.add_argument("--max-length", type=int, default=1024, metavar="T", help="truncate examples to T tokens (default: %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=batch_tokens, metavar="T", help="padded tokens per forward call (default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=resamples, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--strict-base", action="store_true", help="refuse an adapter recorded for another base model")


def check_scoring_args(args: argparse.Namespace) -> None:
    for flag, value in (("--max-examples", args.max_examples), ("--max-length", args.max_length),
                        ("--batch-tokens", args.batch_tokens), ("--resamples", args.resamples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def _pairs(values: list[str], flag: str, meaning: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, separator, rest = value.partition("=")
        if not separator or not name or not rest:
            raise ValueError(f"{flag} {value!r} is not NAME=VALUE; pass {flag} {meaning}")
        if name in pairs:
            raise ValueError(f"{flag} names {name!r} twice; give each name once")
        pairs[name] = rest
    return pairs


def _subfolders_with(folder: str, flag: str, member: str, what: str) -> dict[str, Path]:
    """NAME -> FOLDER/NAME/member for each subfolder that has that file."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{flag} {path} is not a folder; pass a folder of {what}")
    return {child.name: child / member for child in sorted(path.iterdir()) if (child / member).is_file()}


def collect_adapters(args: argparse.Namespace) -> dict[str, Path]:
    adapters = {name: Path(path) for name, path in _pairs(args.adapter, "--adapter", "NAME=PATH").items()}
    if args.adapters:
        found = _subfolders_with(args.adapters, "--adapters", "adapter_config.json", "PEFT adapter folders")
        for name, config in found.items():
            adapters.setdefault(name, config.parent)
    for name, path in adapters.items():
        if not Path(path).is_dir():
            raise ValueError(f"adapter {name}: folder {path} does not exist; pass a PEFT adapter folder")
    return adapters


def collect_data(args: argparse.Namespace) -> dict[str, Path]:
    data = {name: Path(path) for name, path in _pairs(args.data, "--data", "TASK=FILE").items()}
    if args.suite:
        member = f"{args.split}.jsonl"
        for name, path in _subfolders_with(args.suite, "--suite", member, f"<task>/{member}").items():
            data.setdefault(name, path)
    if not data:
        raise ValueError("no task data: pass --data TASK=FILE or --suite DIR")
    for name, path in data.items():
        if not path.is_file():
            raise ValueError(f"task {name}: test file {path} does not exist; fix --data or --suite")
    return data


def run_eval(args: argparse.Namespace) -> int:
    from backbone.model_source import load_pretrained, served_model_name
    from backbone.precision import resolve_precision
    from training.eval_report import write_report
    from training.eval_summary import answer_rows, build_report
    from training.evaluate import load_eval_task, run_evaluation

    check_scoring_args(args)
    if args.speed_rows < 0:
        raise ValueError(f"--speed-rows must be 0 or more, got {args.speed_rows}")
    precision = resolve_precision(args.device, args.dtype)
    adapters = collect_adapters(args)
    data = collect_data(args)
    metrics = _pairs(args.metric, "--metric", "TASK=METRIC")
    formats = _pairs(args.format, "--format", "TASK=FORMAT")
    for flag, named in (("--metric", metrics), ("--format", formats)):
        unknown = sorted(set(named) - set(data))
        if unknown:
            raise ValueError(f"{flag} names task {unknown[0]!r}, which has no data; tasks: {', '.join(data)}")
    log.info("eval on %s %s (%s)", precision.device, precision.dtype_name, precision.reason)
    model, tokenizer = load_pretrained(args.model, dtype=precision.dtype, device=str(precision.device))
    tasks = [
        load_eval_task(name, path, tokenizer, metric=metrics.get(name), data_format=formats.get(name),
                       max_length=args.max_length, max_examples=args.max_examples)
        for name, path in data.items()
    ]
    systems, outputs, speeds = run_evaluation(
        model, tokenizer, adapters, tasks, batch_tokens=args.batch_tokens, speed_rows=args.speed_rows,
        strict_base=args.strict_base, served_model_name=served_model_name(args.model), progress=not args.no_progress,
    )
    report = build_report(
        systems, outputs, speeds, model_name=served_model_name(args.model), resamples=args.resamples, seed=args.seed,
        settings={"device": str(precision.device), "dtype": precision.dtype_name, "batch_tokens": args.batch_tokens,
                  "max_examples": args.max_examples},
    )
    answers = answer_rows(outputs, [system.name for system in systems])
    for path in write_report(report, Path(args.out), answers):
        print(f"wrote {path}")
    for name, task in report["tasks"].items():
        values = ", ".join(f"{system} {entry['value']:.3f}" for system, entry in task["systems"].items())
        print(f"{name} ({task['metric']}): {values}")
    return 0
