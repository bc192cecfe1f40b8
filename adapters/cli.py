"""`loraplex adapter validate | merge | list`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from backbone.config import ModelConfig

from adapters.errors import AdapterError
from adapters.merged_export import export_merged
from adapters.model_spec import resolve_model_folder, served_model_name
from adapters.peft_io import load_adapter
from adapters.store import AdapterStore


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    adapter = subparsers.add_parser("adapter", help="validate, merge and list LoRA adapters")
    commands = adapter.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)

    validate = commands.add_parser("validate", help="check a PEFT adapter folder against a base model")
    validate.add_argument("path", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    validate.add_argument("--model", default="default", help="base model: `default` or a model folder")
    validate.add_argument("--max-rank", type=int, default=None, help="refuse ranks above this")
    validate.add_argument("--strict-base", action="store_true", help="refuse an adapter recorded for another base")
    validate.set_defaults(run=run_validate)

    merge = commands.add_parser("merge", help="write a model folder with an adapter merged into its weights")
    merge.add_argument("--model", default="default", help="base model: `default` or a model folder")
    merge.add_argument("--adapter", required=True, help="PEFT adapter folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model")
    merge.add_argument("--strict-base", action="store_true", help="refuse an adapter recorded for another base")
    merge.set_defaults(run=run_merge)

    publish = commands.add_parser(
        "publish",
        help="validate an adapter and publish it as a new version in a shared store",
        description=(
            "Validate a PEFT adapter against the base model, copy it into the store as a new immutable version "
            "(atomically) and point the name's LATEST at it. Replicas serving with --adapter-store DIR --sync "
            "pick it up within their poll interval; requests already running finish on the old version."
        ),
    )
    publish.add_argument("--store", required=True, metavar="DIR", help="adapter store folder (created if absent)")
    publish.add_argument("name", help="adapter name (letters, digits, '_', '-', '.')")
    publish.add_argument("path", help="PEFT adapter folder")
    publish.add_argument("--version", default=None, help="version name (default: the next vN)")
    publish.add_argument("--model", default="default", help="base model to validate against: `default` or a model folder")
    publish.add_argument("--max-rank", type=int, default=None, help="refuse ranks above this (the replicas' --max-lora-rank)")
    publish.set_defaults(run=run_publish)

    listing = commands.add_parser("list", help="list the adapters and versions of a store")
    listing.add_argument("--root", required=True, help="adapter store folder")
    listing.set_defaults(run=run_list)


def run_validate(args: argparse.Namespace) -> int:
    try:
        folder = resolve_model_folder(args.model)
        model_config = ModelConfig.from_folder(folder)
        weights = load_adapter(
            args.path,
            model_config,
            max_rank=args.max_rank,
            strict_base=args.strict_base,
            served_model_name=served_model_name(args.model),
        )
    except AdapterError as err:
        print(f"INVALID {args.path}: {err}", file=sys.stderr)
        return 2
    kinds = Counter(name.rsplit(".", 1)[-1] for name in weights.tensors)
    ranks = sorted({a.shape[0] for a, _ in weights.tensors.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    targets = ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))
    notes = "".join(f"; warning: {w}" for w in weights.warnings)
    print(f"OK {args.path}: rank {rank_text}, {len(weights.tensors)} modules ({targets}), {weights.num_params:,} params{notes}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    out = export_merged(args.model, args.adapter, args.out, strict_base=args.strict_base)
    print(f"merged {args.adapter} into {args.model}: {out}")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    folder = resolve_model_folder(args.model)
    # The same validation a replica runs, before anything reaches the store: a version every
    # replica would refuse must never become LATEST.
    load_adapter(args.path, ModelConfig.from_folder(folder), max_rank=args.max_rank, served_model_name=served_model_name(args.model))
    store = AdapterStore(args.store)
    version = store.put(args.name, args.path, version=args.version)
    print(f"published {args.name}@{version} to {store.root}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    if not Path(args.root).is_dir():
        print(f"no adapter store at {args.root}", file=sys.stderr)
        return 2
    store = AdapterStore(args.root)
    names = store.list_adapters()
    if not names:
        print(f"no adapters in {args.root}")
    for name in names:
        print(f"{name}\tlatest={store.latest(name)}\tversions={','.join(store.versions(name))}")
    return 0
