"""`loraplex train CONFIG [--resume [CKPT]] [--dry-run]`."""

from __future__ import annotations

import argparse

from training.config import config_reference, load_config

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
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    import json

    from training.recipe import MultiTaskTrainer, describe

    config = load_config(args.config)
    if args.dry_run:
        trainer = MultiTaskTrainer(config)
        print(describe(config))
        print(json.dumps({
            "mix": dict(zip([config.tasks[i].name for i in trainer.trainable_tasks], trainer.mix)),
            "data": {name: data.report() for name, data in trainer.train_data.items()},
            "trainable_parameters": sum(p.numel() for _, p in trainer.adapters.named_parameters()),
        }, indent=2))
        return 0
    summary = MultiTaskTrainer(config).train(resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0
