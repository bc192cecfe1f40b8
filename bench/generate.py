"""Greedy generation throughput: our `generate` against `transformers` generate, same weights, same run.

    .venv/bin/python bench/generate.py [--model default|PATH] [--batches 1 16] [--repeats 5] [--device cuda --dtype bfloat16]

Both sides load the same Hugging Face folder, use the same thread count, take the same prompts
(random ids, `--prompt-len` tokens each) and generate exactly `--new-tokens` tokens greedily
(eos ignored). Runs alternate between the two so that load from other processes hits both alike;
each figure is the median over `--repeats` timed runs after one warm-up. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backbone import load_model  # noqa: E402
from backbone.generate import generate  # noqa: E402
from backbone.sampling import SamplingParams  # noqa: E402
from bench_precision import add_args as add_precision_args, resolve as resolve_precision  # noqa: E402


def resolve_folder(model: str) -> Path:
    if model == "default":
        from backbone.model_source import resolve_model

        return Path(resolve_model("default"))
    return Path(model)


def load_ours(model: str, folder: Path, dtype: torch.dtype, device: torch.device):
    if model == "default":
        from backbone.model_source import load_pretrained

        return load_pretrained("default", dtype=dtype, device=device)[0]
    return load_model(folder, dtype=dtype, device=device)


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Ids above the first few hundred avoid special tokens, which sit at the start of the vocabulary.
    return torch.randint(min(300, vocab // 2), vocab, (batch, length), generator=generator).tolist()


def run_ours(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    completions = generate(model, prompts, SamplingParams(max_tokens=new_tokens), stop_token_ids=())
    return [c.token_ids for c in completions]


def run_reference(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    input_ids = torch.tensor(prompts, device=model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # suppresses eos, so both sides generate the same count
            pad_token_id=0,
        )
    return output[:, input_ids.shape[1] :].tolist()


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - start, tokens


def bench_batch(ours, reference, batch: int, args: argparse.Namespace, vocab: int) -> dict:
    prompts = make_prompts(batch, args.prompt_len, vocab, seed=batch)
    ours_times, reference_times = [], []
    run_ours(ours, prompts, args.new_tokens)  # warm-up: first-call allocations and kernel selection
    run_reference(reference, prompts, args.new_tokens)
    for repeat in range(args.repeats):
        # Alternate which side goes first so slow drifts in machine load do not favour either.
        order = ("ours", "reference") if repeat % 2 == 0 else ("reference", "ours")
        for side in order:
            if side == "ours":
                seconds, our_tokens = timed(run_ours, ours, prompts, args.new_tokens)
                ours_times.append(seconds)
            else:
                seconds, reference_tokens = timed(run_reference, reference, prompts, args.new_tokens)
                reference_times.append(seconds)
    generated = batch * args.new_tokens
    ours_median, reference_median = statistics.median(ours_times), statistics.median(reference_times)
    agree = sum(a == b for ours_row, ref_row in zip(our_tokens, reference_tokens) for a, b in zip(ours_row, ref_row))
    return {
        "batch": batch,
        "generated_tokens": generated,
        "ours_tokens_per_s": round(generated / ours_median, 2),
        "transformers_tokens_per_s": round(generated / reference_median, 2),
        "ratio": round(reference_median / ours_median, 3),
        "ours_seconds": [round(t, 3) for t in ours_times],
        "transformers_seconds": [round(t, 3) for t in reference_times],
        "greedy_token_agreement": round(agree / generated, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default or a Hugging Face model folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_precision_args(parser)
    args = parser.parse_args()
    precision = resolve_precision(args)

    import transformers

    torch.set_num_threads(args.threads)
    folder = resolve_folder(args.model)
    ours = load_ours(args.model, folder, precision.dtype, precision.device)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=precision.dtype).to(precision.device).eval()
    vocab = ours.config.vocab_size
    results = [bench_batch(ours, reference, batch, args, vocab) for batch in args.batches]
    print(
        json.dumps(
            {
                "benchmark": "generate",
                "model": str(folder) if args.model != "default" else "default",
                "threads": args.threads,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "device": str(precision.device),
                "dtype": precision.dtype_name,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
