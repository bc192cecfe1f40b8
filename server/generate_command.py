"""`loraplex generate`: one completion from the base model, optionally through one adapter.

It lives beside the engine rather than in backbone/ because applying an adapter needs adapters/,
which the backbone must not import (DESIGN layout).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from backbone.cli import MODEL_HELP
from backbone.model import CausalLM, Routing
from backbone.precision import add_precision_args

log = logging.getLogger("loraplex.generate")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
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
    add_precision_args(generate)
    generate.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from backbone.generate import generate
    from backbone.model_source import load_pretrained, served_model_name
    from backbone.precision import resolve_precision
    from backbone.sampling import SamplingParams

    precision = resolve_precision(args.device, args.dtype)  # before any loading: a bad flag fails at once

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=list(args.stop),
    )
    model, tokenizer = load_pretrained(args.model, dtype=precision.dtype, device=precision.device)
    log.info("generating on %s in %s (%s)", precision.device, precision.dtype_name, precision.reason)
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
    return AdapterRouting(torch.zeros(1, dtype=torch.long, device=model.inv_freq.device))
