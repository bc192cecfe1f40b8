"""Workloads of bench/serve.py beyond the batch-of-16 cases: the multi-task prefix workload (with
and without the prefix cache) and the greedy agreement of bfloat16 with fp32."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from server.engine import Engine, EngineConfig, GenerationRequest

# Fixed prompts for the bf16-vs-fp32 greedy agreement (chat template applied, 16 new tokens).
AGREEMENT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue?",
    "List two uses of copper.",
    "Who wrote Romeo and Juliet?",
    "Summarize the water cycle in one sentence.",
    "What does a CPU do?",
    "Suggest a name for a pet turtle.",
    "Is a tomato a fruit or a vegetable?",
    "What is the boiling point of water in Celsius?",
]


def prefix_plans(vocab: int, rounds: int, tasks: int = 4, system_tokens: int = 300, requests: int = 16,
                 user_tokens: int = 12) -> list[list[tuple[list[int], str]]]:
    """Per round, `requests` (prompt, adapter) pairs: task i's requests start with task i's own
    system prompt (the same in every round) and end in a user turn of their own (new each round)."""
    generator = torch.Generator().manual_seed(4321)
    systems = torch.randint(100, vocab - 100, (tasks, system_tokens), generator=generator).tolist()
    plans = []
    for _ in range(rounds):
        turns = torch.randint(100, vocab - 100, (requests, user_tokens), generator=generator).tolist()
        plans.append([(systems[i % tasks] + turns[i], f"a{i % tasks}") for i in range(requests)])
    return plans


def timed_run(engine: Engine, plan: list[tuple[list[int], str | None]], new_tokens: int) -> dict:
    """All requests at once; throughput, time to first token per request, and the tokens."""
    params = SamplingParams(max_tokens=new_tokens)
    started = time.perf_counter()
    submitted, handles = [], []
    for prompt, adapter in plan:
        submitted.append(time.monotonic())
        handles.append(engine.submit(GenerationRequest(prompt, params, adapter=adapter)))
    results = [handle.result() for handle in handles]
    seconds = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    ttft = [r.first_token_time - t for r, t in zip(results, submitted) if r.first_token_time is not None]
    return {"seconds": seconds, "tokens": tokens, "ttft": ttft, "token_ids": [r.token_ids for r in results]}


def _summary(runs: list[dict]) -> dict:
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r["tokens"] for r in runs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_s": round(statistics.median(t for r in runs for t in r["ttft"]), 4)}


def prefix_cache_comparison(model_dir: Path, tokenizer: Tokenizer, paths: list[Path], rounds: int, new_tokens: int) -> dict:
    """The prefix workload on two engines, cache on and off, rounds interleaved. Round 0 finds the
    cache empty (the system prompts never seen); later rounds are the steady state, where the
    system prompts were seen by earlier traffic but every user turn is new."""
    vocab = load_model(model_dir).config.vocab_size
    plans = prefix_plans(vocab, rounds + 1)
    engines = {}
    for enabled in (True, False):
        engine = Engine(load_model(model_dir), tokenizer,
                        EngineConfig(max_running=16, max_loras=4, max_lora_rank=16, max_context=512, prefix_cache=enabled),
                        "bench")
        for index in range(4):
            engine.register_adapter(f"a{index}", paths[index])
        engine.start()
        warm = torch.randint(100, vocab - 100, (4, 40), generator=torch.Generator().manual_seed(99)).tolist()
        timed_run(engine, [(p, f"a{i}") for i, p in enumerate(warm)], 2)  # kernels and slots, unrelated prompts
        engines["on" if enabled else "off"] = engine
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for index, plan in enumerate(plans):
        order = ("on", "off") if index % 2 == 0 else ("off", "on")  # a slow spell hits both alike
        for mode in order:
            runs[mode].append(timed_run(engines[mode], plan, new_tokens))
    stats = engines["on"].stats().prefix_cache
    for engine in engines.values():
        engine.shutdown()
    report = {mode: {"first_round_cache_empty": _summary(r[:1]), "steady_state": _summary(r[1:])} for mode, r in runs.items()}
    report["texts_identical"] = all(a["token_ids"] == b["token_ids"] for a, b in zip(runs["on"], runs["off"]))
    report["cache"] = {"hit_tokens": stats.hit_tokens, "miss_tokens": stats.miss_tokens, "evictions": stats.evictions}
    report["workload"] = {"tasks": 4, "system_prompt_tokens": 300, "user_turn_tokens": 12, "requests": 16,
                          "new_tokens": new_tokens, "steady_rounds": rounds, "adapter_per_task": True}
    for phase in ("first_round_cache_empty", "steady_state"):
        on, off = report["on"][phase], report["off"][phase]
        report[f"{phase}_throughput_ratio"] = round(on["tokens_per_s"] / off["tokens_per_s"], 2)
        report[f"{phase}_ttft_p50_ratio"] = round(on["ttft_p50_s"] / off["ttft_p50_s"], 2)
    return report


def greedy_agreement(fp32: Engine, bf16: Engine, tokenizer: Tokenizer, new_tokens: int = 16) -> dict:
    """How many of the fixed prompts get the same greedy tokens from both engines (base model)."""
    plan = [(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}])), None)
            for p in AGREEMENT_PROMPTS]
    reference = timed_run(fp32, plan, new_tokens)["token_ids"]
    candidate = timed_run(bf16, plan, new_tokens)["token_ids"]
    equal = sum(a == b for a, b in zip(reference, candidate))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(reference, candidate)]
    return {"prompts": len(plan), "new_tokens": new_tokens, "identical": equal,
            "identical_fraction": round(equal / len(plan), 3),
            "mean_tokens_before_first_difference": round(sum(prefix) / len(prefix), 2)}
