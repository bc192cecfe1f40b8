"""Two replicas behind the real nginx: adapter-affinity hashing against round robin.

Workload: 200 adapters in a shared store (LoRA r=8 on q/v of the default model), both replicas
serving all of them with 8 slots each (`--sync`), and requests whose adapter follows Zipf(1.0)
popularity, sent through nginx by a pool of concurrent clients. The same request sequence runs
through deploy/nginx/nginx.conf as shipped (consistent hash on the adapter key) and with the hash
line removed (nginx's round robin), each on freshly started replicas. Prints one JSON object:
tokens/s, slot loads (resident-tier misses) and disk loads per request for each, and the ratios.

    .venv/bin/python bench/replicas.py [--quick] [--model default|PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.config import LoraConfig  # noqa: E402
from adapters.store import AdapterStore  # noqa: E402
from adapters.weights import AdapterWeights  # noqa: E402
from backbone.config import ModelConfig  # noqa: E402
from backbone.model_source import resolve_model  # noqa: E402
from gateway import start_nginx, start_replica, wait_ready  # noqa: E402

RANK = 8


def fill_store(store: AdapterStore, model_dir: Path, count: int) -> list[str]:
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"])
    model_config = ModelConfig.from_folder(model_dir)
    names = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        weights = AdapterWeights.initialized(config, model_config, generator=generator)
        for _, lora_B in weights.tensors.values():
            lora_B.normal_(0.0, 0.01, generator=generator)
        name = f"adapter{index:03d}"
        store.put(name, weights)
        names.append(name)
    return names


def zipf_sequence(names: list[str], requests: int, seed: int = 0) -> list[str]:
    weights = [1.0 / rank for rank in range(1, len(names) + 1)]  # Zipf(1.0)
    return random.Random(seed).choices(names, weights=weights, k=requests)


def run_case(folder: Path, model: str, store: Path, sequence: list[str], round_robin: bool, args) -> dict:
    serve_args = ["--model", model, "--served-model-name", "base", "--adapter-store", str(store), "--sync",
                  "--max-loras", str(args.slots), "--max-lora-rank", str(RANK), "--max-cpu-loras", str(args.cpu_loras),
                  "--max-running", str(args.concurrency), "--max-queued", "1024"]
    replicas = [start_replica(folder, serve_args, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    nginx = None
    try:
        wait_ready(replicas, timeout=600)
        nginx = start_nginx(folder / ("nginx-rr" if round_robin else "nginx-hash"), replicas, "base", round_robin)
        before = [(r.metric("loraplex_adapter_slot_loads_total"), r.metric("loraplex_adapter_disk_loads_total"))
                  for r in replicas]

        def one(name: str) -> int:
            body = {"model": name, "prompt": "Translate to French: good morning", "max_tokens": args.new_tokens,
                    "temperature": 0}
            reply = httpx.post(f"{nginx.url}/v1/completions", json=body, timeout=600)
            reply.raise_for_status()
            return reply.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(one, sequence))
        seconds = time.perf_counter() - started
        after = [(r.metric("loraplex_adapter_slot_loads_total"), r.metric("loraplex_adapter_disk_loads_total"))
                 for r in replicas]
        slot_loads = sum(a[0] - b[0] for a, b in zip(after, before))
        disk_loads = sum(a[1] - b[1] for a, b in zip(after, before))
        per_replica = [r.metric("loraplex_requests_total") for r in replicas]
        return {
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 2),
            "slot_loads": int(slot_loads),
            "slot_loads_per_request": round(slot_loads / len(sequence), 3),
            "disk_loads_per_request": round(disk_loads / len(sequence), 3),
            "requests_per_replica": per_replica,
        }
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.process.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true", help="fewer requests (for a smoke run)")
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--slots", type=int, default=8, help="LoRA slots per replica")
    parser.add_argument("--cpu-loras", type=int, default=32, help="parsed adapters kept in CPU memory per replica")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    requests = args.requests or (160 if args.quick else 480)
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = AdapterStore(folder / "store")
        names = fill_store(store, model_dir, args.adapters)
        sequence = zipf_sequence(names, requests)
        affinity = run_case(folder, str(model_dir), store.root, sequence, round_robin=False, args=args)
        round_robin = run_case(folder, str(model_dir), store.root, sequence, round_robin=True, args=args)
    print(json.dumps({
        "workload": {"adapters": args.adapters, "slots_per_replica": args.slots, "replicas": 2, "requests": requests,
                     "concurrency": args.concurrency, "new_tokens": args.new_tokens, "popularity": "zipf(1.0)",
                     "distinct_adapters_requested": len(set(sequence))},
        "affinity_hash": affinity,
        "round_robin": round_robin,
        "ratios": {
            "throughput_affinity_over_round_robin": round(affinity["tokens_per_s"] / round_robin["tokens_per_s"], 3),
            "slot_loads_affinity_over_round_robin": round(
                affinity["slot_loads"] / max(round_robin["slot_loads"], 1), 3),
        },
    }, indent=2))


if __name__ == "__main__":
    main()
