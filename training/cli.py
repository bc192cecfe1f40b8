"""`loraplex train CONFIG [--resume [CKPT]] [--dry-run]`, `loraplex compare --a DIR --b DIR --eval FILE`
and `loraplex eval` (training.eval_command)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from backbone.precision import add_precision_args, resolve_precision
from training.config import config_reference, load_config
from training.data import DATA_FORMATS
from training.eval_command import add_eval_command, add_scoring_args, check_scoring_args

log = logging.getLogger("loraplex.train")

CONFIG_HELP = """\
A YAML or JSON file. Minimal example (see examples/train_*.yaml):

  model: default
  output_dir: runs/demo
  tasks:
    - {name: sentiment, train: tasks/sentiment/train.jsonl, eval: tasks/sentiment/eval.jsonl, format: instruction}
    - {name: summary, train: tasks/summary/train.jsonl, format: chat}
  shared: {r: 8, alpha: 16, targets: all-linear}
  surgery: {method: pcgrad}
  schedule: {max_steps: 200, warmup_steps: 10}

Output: <output_dir>/last/<task>/ (PEFT adapter), last/shared/, last/standalone/<task>/ (task +
shared stacked into one PEFT adapter), best/..., log.jsonl, plots/*.png, checkpoints/, summary.json.

"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="multi-task LoRA training from a YAML/JSON config",
        description="Train one LoRA adapter per task (plus an optional shared adapter with gradient surgery) "
        "over the frozen base model; write PEFT adapters.",
        epilog=CONFIG_HELP + config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="the training config (YAML or JSON)")
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="CKPT",
        help="continue from a checkpoint: the latest in <output_dir>/checkpoints, or the file given",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the config and the data, print the plan, do not train")
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine: re-runs this command under torchrun with N processes "
        "(gloo on CPU, NCCL on GPU, one GPU each); default 1",
    )
    add_precision_args(parser, config_keys=True)  # None: the config's `device`/`dtype`, else auto
    parser.set_defaults(run=run_train)
    _add_compare_command(subparsers)
    add_eval_command(subparsers)


def run_train(args: argparse.Namespace) -> int:
    import json

    from training.distributed import Distributed
    from training.launch import check_nproc, launch, rank_device
    from training.recipe import MultiTaskTrainer, describe

    check_nproc(args.nproc)
    config = load_config(args.config)
    # Flags, then the config's keys, then auto; resolved here so a bad value fails before any loading.
    precision = resolve_precision(args.device or config.device or "auto", args.dtype or config.dtype or "auto")
    if args.nproc > 1 and not args.dry_run:
        return launch(args, precision.device)
    device = rank_device(precision.device)
    config.device, config.dtype = str(device), precision.dtype_name
    log.info("device %s, dtype %s (%s)", precision.device, precision.dtype_name, precision.reason)
    if args.dry_run:
        trainer = MultiTaskTrainer(config)
        print(describe(config))
        print(json.dumps({
            "mix": dict(zip([config.tasks[i].name for i in trainer.trainable_tasks], trainer.mix)),
            "data": {name: data.report() for name, data in trainer.train_data.items()},
            "trainable_parameters": sum(p.numel() for _, p in trainer.adapters.named_parameters()),
        }, indent=2))
        return 0
    distributed = Distributed.from_environment(device)  # torchrun's processes join one job
    try:
        summary = MultiTaskTrainer(config, distributed=distributed).train(resume=args.resume)
    finally:
        distributed.close()
    if distributed.is_main:
        print(json.dumps(summary, indent=2))
        print(f"loraplex train: device {summary['device']}, dtype {summary['dtype']}, peak device memory "
              f"{summary['peak_device_memory_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    return 0


COMPARE_HELP = """\
Each eval example is scored under A, under B and under the base model in one mixed batch (one
model, the two adapters in two slots); the loss is the mean over the answer tokens, as in training.

Writes <out>/report.json (per-arm mean loss with bootstrap 95% CI, token-level loss and perplexity,
the paired difference B - A with its CI, B's win rate, per-example losses) and <out>/comparison.png.
A difference below 0 with a CI that excludes 0 means B has the lower loss on this eval set.

example:
  loraplex compare --model default --a runs/v1/last/geography --b runs/v2/last/geography \\
      --eval tasks/geography/eval.jsonl --out runs/compare-v1-v2
"""


def _add_compare_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="offline A/B comparison of two adapters on an eval set",
        description="Compare two LoRA adapters (e.g. two versions of one task's adapter) by answer-token loss "
        "on an eval set, against each other and the base model.",
        epilog=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default", help="base model: `default`, a model folder or a .gguf file")
    parser.add_argument("--a", required=True, metavar="DIR", help="adapter A (PEFT folder), the reference arm")
    parser.add_argument("--b", required=True, metavar="DIR", help="adapter B (PEFT folder), the candidate arm")
    parser.add_argument("--eval", required=True, metavar="FILE", help="eval set, JSONL in one of the training formats")
    parser.add_argument(
        "--format", choices=DATA_FORMATS, default=None,
        help="record format of --eval (default: detected from the first record's fields)",
    )
    parser.add_argument("--out", default="ab_compare", metavar="DIR", help="folder for report.json and comparison.png (default: %(default)s)")
    add_scoring_args(parser, batch_tokens=2048, resamples=2000)
    add_precision_args(parser)
    parser.add_argument(
        "--generate", action="store_true",
        help="also generate greedy answers and report exact match with the reference (slower)",
    )
    parser.set_defaults(run=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    import json

    from adapters.errors import AdapterNotFoundError
    from backbone.model_source import load_pretrained, served_model_name
    from training.ab_compare import compare_adapters, detect_format, write_outputs
    from training.data import load_task_file

    check_scoring_args(args)
    precision = resolve_precision(args.device, args.dtype)
    log.info("device %s, dtype %s (%s)", precision.device, precision.dtype_name, precision.reason)
    eval_path = Path(args.eval)
    data_format = args.format or detect_format(eval_path)
    for arm, folder in (("A", args.a), ("B", args.b)):  # before the model loads: fail fast
        if not Path(folder).is_dir():
            raise AdapterNotFoundError(f"adapter {arm} folder {folder} does not exist; pass a PEFT adapter folder")
    model, tokenizer = load_pretrained(args.model, dtype=precision.dtype, device=precision.device)
    data = load_task_file(eval_path, data_format, tokenizer, args.max_length)
    examples = data.examples[: args.max_examples]
    report = compare_adapters(
        model, tokenizer, Path(args.a), Path(args.b), examples,
        batch_tokens=args.batch_tokens, resamples=args.resamples, seed=args.seed, exact_match=args.generate,
        strict_base=args.strict_base, served_model_name=served_model_name(args.model),
    )
    paths = write_outputs(report, Path(args.out))
    print(json.dumps({**report.summary(), "format": data_format, "data": data.report()}, indent=2))
    for path in paths:
        print(f"wrote {path}")
    return 0
