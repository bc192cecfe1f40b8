"""Fairness under a flood: tenant A submits 10x max_running requests at once; tenant B then sends
one. Reports B's time to first token against B's time to first token on the idle engine,
measured in the same run, with per-tenant limits and round-robin admission (the server's
defaults with API keys) and with B in A's line (first come, first served: no tenants).

Engine level (the HTTP layer adds the same small cost to every case). Default model, greedy,
prompt 48 tokens, A's requests 32 new tokens, B's 8. Prints a JSON line per case as it is
measured (the first-come-first-served case waits out the whole flood), then the summary.

    .venv/bin/python bench/fairness.py [--quick] [--model default|PATH] [--max-running N]
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

from backbone.loading import load_model  # noqa: E402
from backbone.model_source import resolve_model  # noqa: E402
from backbone.sampling import SamplingParams  # noqa: E402
from backbone.tokenizer import Tokenizer  # noqa: E402
from server.compute_threads import keep_thread_serial  # noqa: E402
from server.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from server.fair_queue import TenantLimitTable, fair_share_defaults  # noqa: E402

PROMPT_TOKENS = 48
A_NEW_TOKENS = 32
B_NEW_TOKENS = 8


def prompt(seed: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab - 100, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()


def b_time_to_first_token(engine: Engine, vocab: int, b_tenant: str, seed: int = 10_000) -> float:
    submitted = time.monotonic()
    handle = engine.submit(GenerationRequest(prompt(seed, vocab), SamplingParams(max_tokens=B_NEW_TOKENS), tenant=b_tenant))
    return handle.result(timeout=3600).first_token_time - submitted


def run(model_dir: Path, max_running: int, limits: TenantLimitTable | None, b_tenant: str, flood: bool) -> float:
    model = load_model(model_dir)
    tokenizer = Tokenizer.from_folder(model_dir)
    # No early end of sequence: every flood request runs its full length, as a worst case does.
    tokenizer.eos_token_ids = [model.config.vocab_size]
    config = EngineConfig(max_running=max_running, max_queued=10_000, tenant_limits=limits or TenantLimitTable())
    engine = Engine(model, tokenizer, config, "bench")
    engine.start()
    try:
        # Warm-up on another prompt: the measured one must not find its prefix cached already.
        b_time_to_first_token(engine, model.config.vocab_size, b_tenant, seed=20_000)
        handles = []
        if flood:
            params = SamplingParams(max_tokens=A_NEW_TOKENS)
            handles = [engine.submit(GenerationRequest(prompt(i, model.config.vocab_size), params, tenant="a"))
                       for i in range(10 * max_running)]
            while engine.stats().running < min(max_running, (limits.default.max_running if limits else None) or max_running):
                time.sleep(0.01)
            time.sleep(0.2)  # the flood is decoding, not just admitted
        ttft = b_time_to_first_token(engine, model.config.vocab_size, b_tenant)
        for handle in handles:
            handle.cancel()
        return ttft
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    args = parser.parse_args()
    keep_thread_serial()
    model_dir = resolve_model(args.model)
    repeats = 1 if args.quick else 3
    fair = TenantLimitTable(fair_share_defaults(args.max_running, 10_000))
    idle = statistics.median(run(model_dir, args.max_running, fair, "b", flood=False) for _ in range(repeats))
    print(json.dumps({"case": "idle", "b_ttft_s": round(idle, 4)}), flush=True)
    flooded_fair = statistics.median(run(model_dir, args.max_running, fair, "b", flood=True) for _ in range(repeats))
    print(json.dumps({"case": "flood_fair", "b_ttft_s": round(flooded_fair, 4), "vs_idle": round(flooded_fair / idle, 2)}), flush=True)
    flooded_fifo = run(model_dir, args.max_running, None, "a", flood=True)
    print(json.dumps({
        "max_running": args.max_running,
        "flood_requests": 10 * args.max_running,
        "tenant_a_row_limit": fair.default.max_running,
        "b_ttft_idle_s": round(idle, 4),
        "b_ttft_flood_fair_s": round(flooded_fair, 4),
        "b_ttft_flood_fifo_s": round(flooded_fifo, 4),
        "fair_vs_idle": round(flooded_fair / idle, 2),
        "fifo_vs_idle": round(flooded_fifo / idle, 2),
        "target_fair_vs_idle": 2.0,
    }))


if __name__ == "__main__":
    main()
