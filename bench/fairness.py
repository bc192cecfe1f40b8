"""Fairness under a flood: tenant A keeps 10x max_running requests queued; tenant B sends one
request at a time. Reports B's time to first token under the flood against B's time to first
token on the idle engine, with per-tenant limits and round-robin admission (the server's defaults
with API keys), and, once, with B in A's line (first come, first served: no tenants).

One engine, rounds interleaved so the machine's load drifts over both cases alike: each round
measures B `--samples` times on the idle engine, then starts A's flood, waits until A's rows
decode, and measures B `--samples` times at random moments of A's steps (B's arrival may land in a decode step or in a
step that prefills A's replacement rows), then cancels the flood. Medians over all samples.
Reported apart, once per round: B sent the moment A's first rows are admitted, so it waits for
the step that prefills all of them (the worst arrival; only a smaller --prefill-chunk shortens it).

Engine level (the HTTP layer adds the same small cost to every case). Default model, greedy,
prompt 48 tokens, B's requests 8 new tokens, A's 8 to 56 (32 on average), so A's rows end at
different steps and their replacements are prefilled often, as with real traffic. Prints a JSON line per round as it is
measured (the first-come-first-served case waits out the whole flood), then the summary.

    .venv/bin/python bench/fairness.py [--quick] [--model default|PATH] [--max-running N] [--rounds R] [--samples K]
                                       [--threads N] [--prefill-chunk N] [--no-fifo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from server.engine import Engine, EngineConfig, GenerationRequest, RequestHandle  # noqa: E402
from server.fair_queue import TenantLimitTable, fair_share_defaults  # noqa: E402

PROMPT_TOKENS = 48
A_NEW_TOKENS = (8, 56)  # drawn per request: rows end, and are replaced, at different steps
B_NEW_TOKENS = 8


class Bench:
    def __init__(
        self, model_dir: Path, max_running: int, limits: TenantLimitTable, threads: int | None = None, prefill_chunk: int = 256
    ) -> None:
        model = load_model(model_dir)
        tokenizer = Tokenizer.from_folder(model_dir)
        # No early end of sequence: every flood request runs its full length, as a worst case does.
        tokenizer.eos_token_ids = [model.config.vocab_size]
        self.vocab = model.config.vocab_size
        self.max_running = max_running
        self.a_rows = min(max_running, limits.default.max_running or max_running)
        config = EngineConfig(
            max_running=max_running, max_queued=10_000, tenant_limits=limits, compute_threads=threads, prefill_chunk=prefill_chunk
        )
        self.engine = Engine(model, tokenizer, config, "bench")
        self.engine.start()
        self.seed = 0  # every prompt is new, so none finds its prefix cached
        self.lengths = random.Random(1)

    def prompt(self) -> list[int]:
        self.seed += 1
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(100, self.vocab - 100, (PROMPT_TOKENS,), generator=generator).tolist()

    def b_time_to_first_token(self, b_tenant: str) -> float:
        submitted = time.monotonic()
        request = GenerationRequest(self.prompt(), SamplingParams(max_tokens=B_NEW_TOKENS), tenant=b_tenant)
        ttft = self.engine.submit(request).result(timeout=3600).first_token_time - submitted
        self.wait_steps(2)  # B is out of the batch before it sends again: each request arrives new
        return ttft

    def start_flood(self, burst_tenant: str | None = None) -> tuple[list[RequestHandle], float | None]:
        """The flood's handles, and with `burst_tenant`, that tenant's time to first token when it
        sends the moment the flood's first rows are admitted."""
        handles = []
        for _ in range(10 * self.max_running):
            params = SamplingParams(max_tokens=self.lengths.randint(*A_NEW_TOKENS))
            handles.append(self.engine.submit(GenerationRequest(self.prompt(), params, tenant="a")))
        while self.engine.stats().running < self.a_rows:
            time.sleep(0.001)
        burst = self.b_time_to_first_token(burst_tenant) if burst_tenant is not None else None
        self.wait_steps(2)  # past the step that prefilled the flood's first rows: they decode
        return handles, burst

    def stop_flood(self, handles: list[RequestHandle]) -> None:
        for handle in handles:
            handle.cancel()
        for handle in handles:
            handle.result(timeout=3600)
        self.wait_steps(2)

    def wait_steps(self, count: int) -> None:
        """Until the worker has run `count` more steps, or has nothing to do."""
        target = self.engine.stats().steps + count
        while True:
            stats = self.engine.stats()
            if stats.steps >= target or (stats.running == 0 and stats.queued == 0):
                return
            time.sleep(0.002)


def fair_rounds(bench: Bench, rounds: int, samples: int, rng: random.Random) -> tuple[list[float], list[float], list[float]]:
    idle, flooded, bursts = [], [], []
    for round_index in range(rounds):
        quiet = [bench.b_time_to_first_token("b") for _ in range(samples)]
        idle += quiet
        flood, burst = bench.start_flood("b")
        bursts.append(burst)
        measured = []
        for _ in range(samples):
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment of A's steps
            measured.append(bench.b_time_to_first_token("b"))
        bench.stop_flood(flood)
        flooded += measured
        print(json.dumps({
            "round": round_index, "b_ttft_idle_s": [round(t, 4) for t in quiet], "b_ttft_flood_s": [round(t, 4) for t in measured],
            "b_ttft_flood_burst_s": round(burst, 4),
        }), flush=True)
    return idle, flooded, bursts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="idle samples, then a flood, per round")
    parser.add_argument("--samples", type=int, default=4, help="B's requests per round on the idle engine and under the flood")
    parser.add_argument("--quick", action="store_true", help="two rounds of two samples")
    parser.add_argument("--threads", type=int, help="the engine's compute threads (default: the usable cores); "
                        "1 holds up better on a machine shared with other work")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the engine's prompt tokens per step (default 256)")
    parser.add_argument("--no-fifo", action="store_true", help="skip the first-come-first-served case (it waits out a flood)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.samples = 2, 2
    keep_thread_serial()
    model_dir = resolve_model(args.model)
    load_before = os.getloadavg()[0]
    fair = TenantLimitTable(fair_share_defaults(args.max_running, 10_000))
    bench = Bench(model_dir, args.max_running, fair, args.threads, args.prefill_chunk)
    try:
        bench.b_time_to_first_token("warm-up")
        idle, flooded, bursts = fair_rounds(bench, args.rounds, args.samples, random.Random(0))
    finally:
        bench.engine.shutdown()
    idle_s, flood_s = statistics.median(idle), statistics.median(flooded)
    summary = {
        "max_running": args.max_running,
        "flood_requests": 10 * args.max_running,
        "tenant_a_row_limit": fair.default.max_running,
        "samples_idle": len(idle),
        "samples_flood": len(flooded),
        "b_ttft_idle_s": round(idle_s, 4),
        "b_ttft_flood_fair_s": round(flood_s, 4),
        "b_ttft_flood_fair_max_s": round(max(flooded), 4),
        "fair_vs_idle": round(flood_s / idle_s, 2),
        "target_fair_vs_idle": 2.0,
        "b_ttft_flood_burst_s": round(statistics.median(bursts), 4),
        "burst_vs_idle": round(statistics.median(bursts) / idle_s, 2),
        "threads": args.threads,
        "prefill_chunk": args.prefill_chunk,
    }
    if not args.no_fifo:
        fifo = Bench(model_dir, args.max_running, TenantLimitTable(), args.threads, args.prefill_chunk)
        try:
            fifo.b_time_to_first_token("a")
            flood, _ = fifo.start_flood()
            flooded_fifo = fifo.b_time_to_first_token("a")  # in A's line, behind the whole flood
            fifo.stop_flood(flood)
        finally:
            fifo.engine.shutdown()
        summary |= {"b_ttft_flood_fifo_s": round(flooded_fifo, 4), "fifo_vs_idle": round(flooded_fifo / idle_s, 2)}
    summary["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
