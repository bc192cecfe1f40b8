"""Soak: minutes of mixed traffic against a real `loraplex serve` while adapters are hot-swapped
every few seconds. Reports requests, failures, latency percentiles per minute, the server's RSS
over time (its slope after warm-up: flat means no leak), and whether every answer is the one the
adapter version named in its `X-Adapter` header gives.

The oracle: every adapter version is a copy of one of a few weight variants (random LoRA weights,
so each gives its own greedy answers). Before the traffic, each variant answers each fixed prompt
alone (greedy, chat and completion) on the same server; during the soak every response is checked
against the answer of the variant its version was loaded from. An answer equal to another
variant's is counted as a wrong version; one equal to no variant's, as a mismatch.

    .venv/bin/python bench/soak.py [--minutes 10] [--model default|PATH] [--adapters 3] [--variants 3]
        [--swap-every 3] [--clients 4] [--max-tokens 8] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters.config import LoraConfig  # noqa: E402
from adapters.peft_io import save_adapter  # noqa: E402
from adapters.weights import AdapterWeights  # noqa: E402
from backbone.config import ModelConfig  # noqa: E402
from backbone.model_source import resolve_model  # noqa: E402
from gateway import start_replica, wait_ready  # noqa: E402

PROMPTS = ["The capital of France is", "List three prime numbers:"]
WARMUP_FRACTION = 0.2  # RSS slope is fitted after this share of the run


def make_variants(model_dir: Path, folder: Path, count: int) -> list[Path]:
    """`count` random adapters on q/v projections: strong enough that each answers differently."""
    config = ModelConfig.from_folder(model_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    paths = []
    for variant in range(count):
        weights = AdapterWeights.initialized(lora, config, generator=torch.Generator().manual_seed(1000 + variant))
        paths.append(save_adapter(folder / f"variant-{variant}", weights))
    return paths


@dataclass
class Outcome:
    minute: int
    seconds: float
    ok: bool
    served_by: str | None = None  # X-Adapter: name@version, or the base's name
    text: str | None = None
    key: tuple[str, str] | None = None  # (kind, prompt)
    error: str | None = None


@dataclass
class Soak:
    url: str
    base: str
    max_tokens: int
    variant_of: dict[str, int] = field(default_factory=dict)  # "name@version" -> variant
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, http: httpx.Client, name: str, path: Path, variant: int) -> None:
        reply = http.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        reply.raise_for_status()
        with self.lock:
            self.variant_of[f"{name}@{reply.json()['version']}"] = variant

    def ask(self, http: httpx.Client, model: str, kind: str, prompt: str, stream: bool) -> tuple[int, str | None, str]:
        """(status, X-Adapter, text); a stream's error event raises."""
        greedy = {"model": model, "max_tokens": self.max_tokens, "temperature": 0, "stream": stream}
        if kind == "chat":
            path, body = "/v1/chat/completions", {**greedy, "messages": [{"role": "user", "content": prompt}]}
        else:
            path, body = "/v1/completions", {**greedy, "prompt": prompt}
        if not stream:
            reply = http.post(f"{self.url}{path}", json=body)
            if reply.status_code != 200:
                return reply.status_code, None, reply.text[:200]
            choice = reply.json()["choices"][0]
            return 200, reply.headers.get("x-adapter"), choice["message"]["content"] if kind == "chat" else choice["text"]
        pieces = []
        with http.stream("POST", f"{self.url}{path}", json=body) as reply:
            if reply.status_code != 200:
                return reply.status_code, None, reply.read().decode()[:200]
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error event: {event['error']}")
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                    pieces.append(piece or "")
            return 200, reply.headers.get("x-adapter"), "".join(pieces)


def calibrate(soak: Soak, variants: list[Path]) -> tuple[dict, dict]:
    """Each variant's and the base's answers to every fixed prompt, asked alone."""
    expected: dict[int, dict] = {}
    with httpx.Client(timeout=600) as http:
        base = {(kind, p): soak.ask(http, soak.base, kind, p, False)[2] for kind in ("chat", "completion") for p in PROMPTS}
        for variant, path in enumerate(variants):
            soak.load(http, "calibration", path, variant)
            expected[variant] = {(kind, p): soak.ask(http, "calibration", kind, p, False)[2]
                                 for kind in ("chat", "completion") for p in PROMPTS}
        http.post(f"{soak.url}/v1/unload_lora_adapter", json={"lora_name": "calibration"}).raise_for_status()
    return base, expected


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def slope_per_minute(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 3:
        return None
    xs, ys = [t / 60 for t, _ in samples], [v for _, v in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else None


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3)


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    model_dir = resolve_model(args.model)
    variants = make_variants(model_dir, work / "adapters", args.variants)
    replica = start_replica(work, ["--model", str(model_dir), "--served-model-name", "base", "--dtype", args.dtype,
                                   "--adapter-root", str(work / "adapters"), "--max-loras", str(args.adapters + 2),
                                   "--no-dashboard", "--prefix-cache-mb", str(args.prefix_cache_mb)])
    try:
        wait_ready([replica], timeout=600)
        soak = Soak(replica.url, "base", args.max_tokens)
        base_answers, expected = calibrate(soak, variants)
        names = [f"adapter-{i}" for i in range(args.adapters)]
        current = {name: i % args.variants for i, name in enumerate(names)}
        with httpx.Client(timeout=600) as http:
            for name in names:
                soak.load(http, name, variants[current[name]], current[name])
        return drive(args, soak, replica.process.pid, names, current, variants, base_answers, expected)
    finally:
        replica.terminate()
        replica.process.wait(120)
        if replica.process.returncode == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:  # keep the server's log for a look
            print(f"the server exited with {replica.process.returncode}; its log: {replica.log_path}", file=sys.stderr)


def drive(args, soak: Soak, pid: int, names: list[str], current: dict[str, int], variants: list[Path],
          base_answers: dict, expected: dict) -> dict:
    started = time.monotonic()
    deadline = started + args.minutes * 60
    outcomes: list[Outcome] = []
    rss: list[tuple[float, float]] = []
    caches: list[tuple[float, float]] = []  # (prefix cache MB, parsed adapters in CPU memory), with each RSS sample
    swaps = {"done": 0, "failed": 0}
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < deadline:
                model = rng.choice([soak.base, *names])
                kind, prompt, stream = rng.choice(["chat", "completion"]), rng.choice(PROMPTS), rng.random() < 0.5
                sent = time.monotonic()
                try:
                    status, served_by, text = soak.ask(http, model, kind, prompt, stream)
                    outcome = Outcome(int((sent - started) // 60), time.monotonic() - sent, status == 200, served_by,
                                      text, (kind, prompt), None if status == 200 else f"{status}: {text}")
                except Exception as err:  # counted, never fatal: the soak measures exactly these
                    outcome = Outcome(int((sent - started) // 60), time.monotonic() - sent, False, error=repr(err)[:200])
                outcomes.append(outcome)

    def swapper() -> None:
        with httpx.Client(timeout=600) as http:
            turn = 0
            while not stop.wait(args.swap_every):
                name = names[turn % len(names)]
                turn += 1
                current[name] = (current[name] + 1) % len(variants)
                try:
                    soak.load(http, name, variants[current[name]], current[name])
                    swaps["done"] += 1
                except Exception:
                    swaps["failed"] += 1

    def sampler() -> None:  # RSS beside the bounded caches that may explain its growth
        with httpx.Client(timeout=60) as http:
            while not stop.wait(5):
                metrics = http.get(f"{soak.url}/metrics").text
                caches.append((gauge(metrics, "loraplex_prefix_cache_bytes") / 2**20, gauge(metrics, "loraplex_cpu_adapters")))
                rss.append((time.monotonic() - started, rss_mb(pid)))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    helpers = [threading.Thread(target=swapper), threading.Thread(target=sampler)]
    for thread in [*threads, *helpers]:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    for thread in helpers:
        thread.join()
    return summarize(args, soak, outcomes, rss, caches, swaps, base_answers, expected)


def summarize(args, soak: Soak, outcomes: list[Outcome], rss, caches, swaps, base_answers: dict, expected: dict) -> dict:
    wrong_version, mismatched, checked, unknown_version = [], [], 0, 0
    for outcome in outcomes:
        if not outcome.ok:
            continue
        if outcome.served_by == soak.base:
            want, others = base_answers[outcome.key], []
        elif outcome.served_by in soak.variant_of:
            variant = soak.variant_of[outcome.served_by]
            want = expected[variant][outcome.key]
            others = [answers[outcome.key] for other, answers in expected.items() if other != variant]
        else:
            unknown_version += 1
            continue
        checked += 1
        if outcome.text != want:
            record = {"served_by": outcome.served_by, "key": outcome.key, "got": outcome.text, "want": want}
            (wrong_version if outcome.text in others else mismatched).append(record)
    minutes = []
    for minute in range(int(args.minutes + 0.999)):
        mine = [o for o in outcomes if o.minute == minute]
        latencies = [o.seconds for o in mine if o.ok]
        in_minute = [mb for t, mb in rss if minute * 60 <= t < (minute + 1) * 60]
        minutes.append({
            "minute": minute, "requests": len(mine), "failures": sum(not o.ok for o in mine),
            "p50_s": percentile(latencies, 0.50), "p95_s": percentile(latencies, 0.95), "p99_s": percentile(latencies, 0.99),
            "rss_mb": round(statistics.median(in_minute), 1) if in_minute else None,
        })
    after_warmup = [(t, mb) for t, mb in rss if t >= WARMUP_FRACTION * args.minutes * 60]
    slope = slope_per_minute(after_warmup)
    distinct = sum(len({answers[key] for answers in expected.values()}) == len(expected) for key in expected[0])
    return {
        "minutes": args.minutes, "model": args.model, "dtype": args.dtype, "clients": args.clients,
        "adapters": args.adapters, "variants": args.variants, "swap_every_s": args.swap_every, "prefix_cache_mb": args.prefix_cache_mb, "max_tokens": args.max_tokens,
        "load_average": os.getloadavg(),
        "requests": len(outcomes), "failures": sum(not o.ok for o in outcomes),
        "failure_examples": [o.error for o in outcomes if not o.ok][:5],
        "swaps": swaps, "answers_checked": checked, "wrong_version_answers": len(wrong_version),
        "mismatched_answers": len(mismatched), "unknown_version_answers": unknown_version,
        "mismatch_examples": (wrong_version + mismatched)[:3],
        "prompts_where_all_variants_differ": f"{distinct}/{len(expected[0])}",
        "per_minute": minutes,
        "rss_mb": {"first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                   "max": max((mb for _, mb in rss), default=None),
                   "slope_mb_per_min_after_warmup": None if slope is None else round(slope, 3),
                   "every_30_s": [round(mb, 1) for _, mb in rss[5::6]],  # sampled every 5 s
                   "prefix_cache_mb_every_30_s": [round(mb, 1) for mb, _ in caches[5::6]],
                   "cpu_adapters_every_30_s": [int(count) for _, count in caches[5::6]]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="default", help="`default` (SmolLM2-135M-Instruct) or a model folder")
    parser.add_argument("--dtype", default="float32", help="float32 keeps greedy answers exact across batch shapes")
    parser.add_argument("--adapters", type=int, default=3, help="adapter names under traffic and swaps")
    parser.add_argument("--variants", type=int, default=3, help="distinct weight sets the versions cycle through")
    parser.add_argument("--swap-every", type=float, default=3.0, help="seconds between hot swaps")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client loops")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prefix-cache-mb", type=int, default=256,
                        help="the server's prefix cache budget; a small one fills early, so RSS growth after "
                        "warm-up is not the cache filling")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
