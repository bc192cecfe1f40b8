"""Serving throughput of the engine against transformers and PEFT, measured in the same run.

Workload (DESIGN.md): 16 concurrent requests, prompt 64 tokens, 32 new tokens, greedy, LoRA r=16
on every linear layer of the default model, random adapters whose B is non-zero at the scale of a
trained adapter. Prints one JSON object: tokens/s of the engine with 0, 1, 4 and 16 distinct
adapters, of `transformers.generate` (base) and of PEFT's mixed batch (`adapter_names`, 16
adapters), the ratios, adapter hot-load latency, and throughput with many registered adapters
and few slots under Zipf popularity relative to all of them resident. Also: the multi-task
prefix workload with and without the prefix cache (bench/serve_workloads.py), and, on a CPU with
native bf16, the same engine cases with the model in bfloat16 and their greedy agreement with fp32.
The one-adapter case also runs on an engine that never merges single-adapter batches into a copy
of the weights (`ours_unmerged`), so the merge's share shows beside it.

    .venv/bin/python bench/serve.py [--quick] [--model default|PATH] [--sections adapters,prefix,bf16,...]
                                    [--device cuda --dtype bfloat16]

With --device/--dtype, our engine and the transformers/PEFT references run on that device in
that dtype alike (the bf16 rows are then skipped: they compare bf16 with fp32 on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.config import LoraConfig  # noqa: E402
from adapters.peft_io import save_adapter  # noqa: E402
from adapters.weights import AdapterWeights  # noqa: E402
from backbone.loading import load_model  # noqa: E402
from backbone.model_source import resolve_model  # noqa: E402
from backbone.precision import cpu_has_native_bf16  # noqa: E402
from backbone.sampling import SamplingParams  # noqa: E402
from backbone.tokenizer import Tokenizer  # noqa: E402
from server.compute_threads import DEFAULT_COMPUTE_THREADS, claim_compute, keep_thread_serial  # noqa: E402
from server.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from bench.serve_workloads import greedy_agreement, prefix_cache_comparison  # noqa: E402
from bench_precision import add_args as add_precision_args, peak_memory, resolve as resolve_precision, synchronize  # noqa: E402

SECTIONS = ("adapters", "bf16", "prefix", "references", "zipf")

RANK = 16
B_STD = 0.01  # trained LoRA B entries are small; zero B (PEFT's init) would hide the adapter cost


def make_adapters(model_dir: Path, folder: Path, count: int) -> list[Path]:
    model = load_model(model_dir)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        weights = AdapterWeights.initialized(config, model, generator=generator)
        for _, lora_B in weights.tensors.values():
            lora_B.normal_(0.0, B_STD, generator=generator)
        paths.append(save_adapter(folder / f"adapter{index}", weights))
    return paths


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(100, vocab - 100, (count, length), generator=generator).tolist()


def engine_run(engine: Engine, batch: list[list[int]], adapters: list[str | None], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens)
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(p, params, adapter=a)) for p, a in zip(batch, adapters)]
    results = [handle.result() for handle in handles]
    seconds = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def hf_generate(model, batch: list[list[int]], new_tokens: int, adapter_names: list[str] | None = None) -> dict:
    input_ids = torch.tensor(batch, device=model.device)
    extra = {"adapter_names": adapter_names} if adapter_names else {}
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
        synchronize(out.device)
        seconds = time.perf_counter() - started
    tokens = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def zipf_plan(names: list[str], streams: int, per_stream: int, seed: int) -> list[list[str]]:
    """Each stream's adapters, drawn from Zipf(1.0) popularity over `names`."""
    weights = torch.tensor([1.0 / (rank + 1) for rank in range(len(names))])
    draws = torch.multinomial(weights, streams * per_stream, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [[names[i] for i in draws[s * per_stream : (s + 1) * per_stream].tolist()] for s in range(streams)]


def run_streams(engine: Engine, plan: list[list[str]], prompt: list[int], new_tokens: int) -> dict:
    """One client per stream, each sending its requests one after another."""
    params = SamplingParams(max_tokens=new_tokens)
    tokens = [0] * len(plan)

    def client(stream: int) -> None:
        for name in plan[stream]:
            tokens[stream] += engine.submit(GenerationRequest(prompt, params, adapter=name)).result().completion_tokens

    threads = [threading.Thread(target=client, args=(s,)) for s in range(len(plan))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / seconds, 2)}


def in_compute_thread(work):
    """Run `work` in a fresh thread that owns the parallel math, as the engine's worker does."""
    result = {}

    def run() -> None:
        claim_compute(None)
        result["value"] = work()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result["value"]


def fastest(runs: list[dict]) -> dict:
    return min(runs, key=lambda run: run["seconds"])


def references(
    model_dir: Path, paths: list[Path], batch: list[list[int]], new_tokens: int, skip_peft: bool, rounds: int,
    dtype: torch.dtype, device: torch.device,
) -> dict:
    """transformers and PEFT, warmed up and timed with the same best-of-`rounds` as our cases."""
    import transformers

    report = {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf_generate(hf, batch[:2], 2)  # warm-up
    report["transformers_generate_base"] = fastest([hf_generate(hf, batch, new_tokens) for _ in range(rounds)])
    if not skip_peft:
        import peft

        peft_model = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
        for index, path in enumerate(paths[1:], 1):
            peft_model.load_adapter(path, adapter_name=f"a{index}")
        peft_model.eval()
        names = [f"a{i}" for i in range(len(batch))]
        hf_generate(peft_model, batch[:4], 2, names[:4])  # warm-up
        report["peft_mixed_batch_16_adapters"] = fastest([hf_generate(peft_model, batch, new_tokens, names) for _ in range(rounds)])
    return report


def round_ratio_summary(rounds: list[dict[int, float]]) -> dict:
    """The median over rounds of each case's tokens/s over its own round's base, with the per-round
    ratios themselves: their spread is the noise of the machine."""
    summary = {}
    for distinct in rounds[0]:
        per_round = [ratio[distinct] for ratio in rounds]
        summary[f"{distinct}_adapters_vs_base_median"] = round(statistics.median(per_round), 3)
        summary[f"{distinct}_adapters_vs_base_per_round"] = [round(ratio, 3) for ratio in per_round]
    return summary


def ratios(report: dict) -> dict:
    """Every ratio the parts that ran allow, each between two figures of this run."""
    ours = report["ours"]
    base = ours["0_adapters"]["tokens_per_s"]
    found = {f"ours_{d}_adapters_vs_ours_base": round(ours[f"{d}_adapters"]["tokens_per_s"] / base, 2) for d in (1, 4, 16)}
    if "ours_unmerged" in report:  # against its own engine's base
        unmerged = report["ours_unmerged"]
        found["ours_1_adapter_unmerged_vs_its_base"] = round(
            unmerged["1_adapters"]["tokens_per_s"] / unmerged["0_adapters"]["tokens_per_s"], 2
        )
    if "transformers_generate_base" in report:
        found["ours_base_vs_transformers"] = round(base / report["transformers_generate_base"]["tokens_per_s"], 2)
    if "peft_mixed_batch_16_adapters" in report:
        found["ours_16_adapters_vs_peft"] = round(
            ours["16_adapters"]["tokens_per_s"] / report["peft_mixed_batch_16_adapters"]["tokens_per_s"], 2
        )
    if "zipf" in report:
        zipf = report["zipf"]
        found["zipf_8_slots_vs_all_resident"] = round(zipf["8_slots"]["tokens_per_s"] / zipf["all_resident"]["tokens_per_s"], 2)
    if "ours_bfloat16" in report:
        bf16 = report["ours_bfloat16"]
        bf16_base = bf16["0_adapters"]["tokens_per_s"]
        found["bf16_base_vs_fp32_base"] = round(bf16_base / base, 2)
        for d in (1, 4, 16):
            found[f"bf16_{d}_adapters_vs_bf16_base"] = round(bf16[f"{d}_adapters"]["tokens_per_s"] / bf16_base, 2)
            found[f"bf16_{d}_adapters_vs_fp32_{d}_adapters"] = round(
                bf16[f"{d}_adapters"]["tokens_per_s"] / ours[f"{d}_adapters"]["tokens_per_s"], 2
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true", help="smaller Zipf run and fewer registered adapters")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds of our cases, interleaved (the fastest of each is kept, and the median of per-round ratios reported)")
    parser.add_argument("--skip-peft", action="store_true", help="skip the (slow) PEFT mixed-batch reference")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated parts to run (default all): {', '.join(SECTIONS)}")
    add_precision_args(parser)
    args = parser.parse_args()
    precision = resolve_precision(args)
    dtype, device = precision.dtype, precision.device
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    if "bf16" in sections and (device.type != "cpu" or dtype != torch.float32):
        sections.discard("bf16")  # those rows compare bf16 with fp32 on a CPU
    elif "bf16" in sections and not cpu_has_native_bf16():
        sections.discard("bf16")
        print("skipping the bf16 rows: this CPU has no native bf16 (AVX-512-BF16 or AMX)", file=sys.stderr)
    batch_size, prompt_len, new_tokens = 16, 64, 32
    zipf_adapters, zipf_streams_count, per_stream = (50, 16, 2) if args.quick else (200, 32, 3)

    # As in the server, one thread at a time runs parallel math: the engine's worker, or the
    # thread running a reference (server/compute_threads.py explains the 1.5x it costs otherwise).
    keep_thread_serial()
    model_dir = resolve_model(args.model)
    tokenizer = Tokenizer.from_folder(model_dir)
    vocab = load_model(model_dir).config.vocab_size
    batch = prompts(batch_size, prompt_len, vocab)
    report: dict = {"workload": {"requests": batch_size, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                                 "lora_rank": RANK, "targets": "all linear", "model": str(args.model),
                                 "threads": DEFAULT_COMPUTE_THREADS, "rounds": args.rounds,
                                 "device": str(device), "dtype": precision.dtype_name}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_dir, Path(tmp), batch_size)

        if "prefix" in sections:
            report["prefix_workload"] = prefix_cache_comparison(model_dir, tokenizer, paths, 1 if args.quick else 3, new_tokens)
        if "adapters" not in sections:
            print(json.dumps(report, indent=2))
            return

        # ---- ours ----
        # "main" runs in the flags' device and dtype (fp32 on the CPU by default); "bf16" is the
        # same engine in bfloat16 on the CPU, for the bf16 rows; "unmerged" is "main" with
        # single-adapter batches never merged into a copy of the weights (adapters/merged_slot.py),
        # so the one-adapter case shows what merging gives, against its own round's base.
        variants = {"main": (dtype, True, (0, 1, 4, 16)), "unmerged": (dtype, False, (0, 1))}
        if "bf16" in sections:
            variants["bf16"] = (torch.bfloat16, True, (0, 1, 4, 16))
        register_seconds: list[float] = []

        def start_engine(engine_dtype: torch.dtype, timed: bool, merge: bool = True) -> Engine:
            # Rounds repeat the same prompts: the prefix cache (measured on its own workload above)
            # is off here, so every round prefills its whole prompts as the first one does.
            engine = Engine(load_model(model_dir, dtype=engine_dtype, device=device), tokenizer,
                            EngineConfig(max_running=batch_size, max_loras=batch_size, max_lora_rank=RANK,
                                         max_context=prompt_len + new_tokens, prefix_cache=False,
                                         merge_single_adapter=merge), "bench")
            for index, path in enumerate(paths):
                started = time.perf_counter()
                engine.register_adapter(f"a{index}", path)
                if timed:  # the figure reported below
                    register_seconds.append(time.perf_counter() - started)
            engine.start()
            engine_run(engine, batch[:4], [f"a{i}" for i in range(4)], 4)  # warm-up: kernels, slots
            engine_run(engine, batch, [f"a{i}" for i in range(batch_size)], 2)  # every adapter resident
            # The timed cases' shapes at every length (attention over each key span), so the first
            # case of a round does not pay for kernels the later ones find ready.
            engine_run(engine, batch, [None] * batch_size, new_tokens)
            return engine

        results = {name: {} for name in variants}
        round_ratios = {name: [] for name in variants}  # per round: each case's tokens/s over that round's base
        stats = None
        # Only one engine is alive at a time: each engine's worker owns an OpenMP team, and two
        # teams on these cores make every small matmul of both pay a futex wake-up
        # (server/compute_threads.py), which slowed the fp32 engine by a third beside an idle
        # bf16 one. So every round starts each engine afresh, runs its cases and shuts it down.
        # Rounds interleave the engines and each case keeps its fastest round: the machine is
        # shared, and interleaving spreads a slow spell over all cases instead of one. A round
        # runs an engine's cases back to back, so its own ratios share one state of the machine:
        # their median (beside the ratios of the fastest rounds) shows how much the noise moved them.
        # A fresh engine also merges afresh: the one-adapter case pays for its merge every round.
        for round_index in range(args.rounds):
            for name, (engine_dtype, merge, cases) in variants.items():
                engine = start_engine(engine_dtype, timed=round_index == 0 and name == "main", merge=merge)
                speed = {}
                for distinct in cases:
                    adapters = [None if distinct == 0 else f"a{row % distinct}" for row in range(batch_size)]
                    run = engine_run(engine, batch, adapters, new_tokens)
                    speed[distinct] = run["tokens_per_s"]
                    best = results[name].get(f"{distinct}_adapters")
                    if best is None or run["seconds"] < best["seconds"]:
                        results[name][f"{distinct}_adapters"] = run
                round_ratios[name].append({d: speed[d] / speed[0] for d in cases if d})
                if stats is None and name == "main":
                    stats = engine.stats()
                engine.shutdown()
        if "bf16" in variants:  # token ids only: here both engines may be alive, which slows but does not change them
            main_engine, bf16_engine = start_engine(dtype, False), start_engine(torch.bfloat16, False)
            report["bf16_greedy_agreement_with_fp32"] = greedy_agreement(main_engine, bf16_engine, tokenizer)
            main_engine.shutdown()
            bf16_engine.shutdown()
        ours = results["main"]
        report["ours"] = ours
        report["ours_round_ratios"] = round_ratio_summary(round_ratios["main"])
        report["merged_adapter_first_round"] = vars(stats.merged_adapter)  # batches run merged, merge time, bytes
        report["ours_unmerged"] = results["unmerged"]
        report["ours_unmerged_round_ratios"] = round_ratio_summary(round_ratios["unmerged"])
        if "bf16" in round_ratios:
            report["ours_bfloat16_round_ratios"] = round_ratio_summary(round_ratios["bf16"])
        if "bf16" in results:
            report["ours_bfloat16"] = results["bf16"]
        report["hot_load"] = {
            "register_seconds_p50": round(statistics.median(register_seconds), 4),
            "register_seconds_p95": round(statistics.quantiles(register_seconds, n=20)[-1], 4),
            "slot_write_seconds_p50": stats.slot_write_seconds_p50,
            "slot_write_seconds_p95": stats.slot_write_seconds_p95,
            "note": "register = read + validate from disk into the CPU tier; slot write = CPU tier -> resident slot",
        }

        # ---- references ----
        if "references" in sections:
            report.update(in_compute_thread(
                lambda: references(model_dir, paths, batch, new_tokens, args.skip_peft, args.rounds, dtype, device)
            ))  # fmt: skip

        # ---- many registered adapters, few slots, Zipf popularity ----
        if "zipf" in sections:
            names = [f"z{i}" for i in range(zipf_adapters)]
            plan = zipf_plan(names, zipf_streams_count, per_stream, seed=7)
            drawn = sorted({name for stream in plan for name in stream})
            prompt = batch[0]
            zipf = {"distinct_adapters_drawn": len(drawn)}
            # The reference keeps every adapter the run uses resident (one slot each, loaded before
            # timing); the measured case has 8 slots and the default CPU tier of 32.
            for case, slots, cpu in (("8_slots", 8, 32), ("all_resident", len(drawn), len(drawn))):
                engine = Engine(load_model(model_dir, dtype=dtype, device=device), tokenizer,
                                EngineConfig(max_running=zipf_streams_count, max_loras=slots, max_cpu_loras=cpu,
                                             max_lora_rank=RANK, max_context=prompt_len + new_tokens, prefix_cache=False),
                                "bench")
                for index, name in enumerate(names):
                    engine.register_adapter(name, paths[index % len(paths)])
                engine.start()
                if case == "all_resident":
                    for first in range(0, len(drawn), zipf_streams_count):
                        group = drawn[first : first + zipf_streams_count]
                        engine_run(engine, [prompt] * len(group), group, 1)
                before = engine.stats()
                zipf[case] = run_streams(engine, plan, prompt, new_tokens)
                after = engine.stats()
                zipf[case]["disk_loads"] = after.disk_loads - before.disk_loads
                zipf[case]["slot_writes"] = after.slot_writes - before.slot_writes
                engine.shutdown()
            zipf["registered_adapters"] = zipf_adapters
            zipf["streams"] = zipf_streams_count
            zipf["note"] = f"{zipf_adapters} names registered over {len(paths)} distinct adapter folders (each name its own CPU entry and slot)"
            report["zipf"] = zipf

    report["ratios"] = ratios(report)
    report["peak_device_memory_bytes"] = peak_memory(device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
