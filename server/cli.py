"""The `loraplex` command. Each package contributes its own subcommands through `add_commands`;
this file only assembles them and turns known errors into one-line messages."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Packages that add subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "server.serve_command", "server.experiment_report", "backbone.cli", "server.generate_command", "adapters.cli", "training.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Train and serve many LoRA task adapters over one frozen LLM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as err:
        # Our errors subclass ValueError/OSError and say what is wrong and how to fix it.
        print(f"loraplex {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
