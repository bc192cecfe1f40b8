"""Prometheus metrics, one `CollectorRegistry` per app so test apps (and replicas in one process)
never share counters.

Request metrics are labelled by adapter *name* (not name@version, so a hot swap does not start a
new series); the base model's requests carry the base's served name. Engine state (queue, rows,
resident adapters) is read from `Engine.stats()` at scrape time, so it is never stale."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets sized for CPU serving of small models: tens of ms per token, seconds per request.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

UNROUTED = "-"  # label for requests refused before an adapter was chosen


class ServerMetrics:
    def __init__(self, stats_source: Callable[[], Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "Generation requests received", ["adapter", "endpoint"], registry=r
        )
        self.errors = Counter(
            "loraplex_request_errors", "Requests answered with an error status", ["adapter", "status"], registry=r
        )
        self.finished = Counter(
            "loraplex_requests_finished", "Generations finished, by finish reason", ["adapter", "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter(
            "loraplex_generation_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds", "Arrival to first generated token", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between generated tokens", ["adapter"],
            buckets=TOKEN_GAP_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "loraplex_e2e_request_latency_seconds", "Arrival to last token", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        # The same request figures by task (requests routed through the task table), for the
        # dashboard's per-task traffic; direct adapter requests have no task and are not counted here.
        self.task_requests = Counter(
            "loraplex_task_requests", "Generation requests routed by task, by the adapter (arm) chosen", ["task", "adapter"],
            registry=r,
        )
        self.task_generation_tokens = Counter(
            "loraplex_task_generation_tokens", "Tokens generated, by task", ["task"], registry=r
        )
        self.task_ttft = Histogram(
            "loraplex_task_time_to_first_token_seconds", "Arrival to first generated token, by task", ["task"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.task_e2e = Histogram(
            "loraplex_task_e2e_request_latency_seconds", "Arrival to last token, by task", ["task"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.adapter_load = Histogram(
            "loraplex_adapter_load_seconds", "Time to validate and register an adapter", ["outcome"],
            buckets=LOAD_BUCKETS, registry=r,
        )
        if stats_source is not None:
            r.register(EngineStatsCollector(stats_source))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class GenerationTimer:
    """Per-request timings fed to the histograms as tokens arrive."""

    def __init__(self, metrics: ServerMetrics, adapter: str, arrival: float, task: str | None = None) -> None:
        self.metrics = metrics
        self.adapter = adapter
        self.task = task
        self.arrival = arrival
        self.last_token_time: float | None = None

    def on_tokens(self, count: int, now: float | None = None) -> None:
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        if self.last_token_time is None:
            self.metrics.ttft.labels(self.adapter).observe(now - self.arrival)
            if self.task is not None:
                self.metrics.task_ttft.labels(self.task).observe(now - self.arrival)
            count -= 1
        elif count:
            # A delta may carry several tokens (held back by stop-string or UTF-8 checks):
            # spread the gap over them, as each was produced within it.
            gap = (now - self.last_token_time) / count
            for _ in range(count):
                self.metrics.inter_token.labels(self.adapter).observe(gap)
        self.last_token_time = now

    def on_finished(self, prompt_tokens: int, completion_tokens: int, finish_reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        m = self.metrics
        m.e2e.labels(self.adapter).observe(now - self.arrival)
        m.prompt_tokens.labels(self.adapter).inc(prompt_tokens)
        m.generation_tokens.labels(self.adapter).inc(completion_tokens)
        m.finished.labels(self.adapter, finish_reason).inc()
        if self.task is not None:
            m.task_e2e.labels(self.task).observe(now - self.arrival)
            m.task_generation_tokens.labels(self.task).inc(completion_tokens)


class EngineStatsCollector(Collector):
    """Gauges read from the engine at scrape time, including vLLM's `vllm:lora_requests_info`,
    whose labels gateways (Gateway API Inference Extension, llm-d) parse to route by affinity."""

    def __init__(self, stats_source: Callable[[], Any]) -> None:
        self.stats_source = stats_source

    def describe(self) -> list[Metric]:
        return []  # values come from the engine at collect time; no fixed description

    def collect(self) -> Iterator[Metric]:
        stats = self.stats_source()
        if stats is None:  # engine not started yet
            return
        yield _gauge("loraplex_num_requests_waiting", "Requests queued for a batch row", stats.queued)
        yield _gauge("loraplex_num_requests_running", "Rows decoding now", stats.running)
        yield _gauge("loraplex_max_running", "Batch rows", stats.max_running)
        resident = GaugeMetricFamily(
            "loraplex_adapter_resident_requests", "Running requests on each resident adapter (name@version)",
            labels=["adapter", "slot"],
        )
        for entry in stats.resident:
            resident.add_metric([f"{entry.name}@{entry.version}", str(entry.slot)], float(entry.in_use))
        yield resident
        yield _gauge("loraplex_resident_adapters", "Adapters in LoRA slots", len(stats.resident))
        yield _gauge("loraplex_max_loras", "LoRA slots", stats.max_loras)
        yield _gauge("loraplex_cpu_adapters", "Parsed adapters kept in CPU memory", stats.cpu_cache_entries)
        # Slot loads count the misses of the resident tier: what gateway affinity is meant to save.
        yield CounterMetricFamily("loraplex_adapter_slot_loads", "Adapter copies from CPU into a LoRA slot", value=stats.slot_writes)
        yield CounterMetricFamily("loraplex_adapter_disk_loads", "Adapter reads from disk", value=stats.disk_loads)
        for quantile, value in (("p50", stats.disk_load_seconds_p50), ("p95", stats.disk_load_seconds_p95)):
            if value is not None:
                yield _gauge(
                    f"loraplex_adapter_disk_load_seconds_{quantile}", f"Adapter read-and-validate time, {quantile}", value
                )
        if stats.prefix_cache is not None:
            yield from _prefix_cache_metrics(stats.prefix_cache)
        if stats.merged_adapter is not None:
            merged = stats.merged_adapter
            yield CounterMetricFamily(
                "loraplex_merged_adapter_batches", "Batches all on one adapter that ran on its merged weights", value=merged.batches
            )
            yield CounterMetricFamily(
                "loraplex_merged_adapter_merge_seconds", "Time spent merging adapters into copies of the weights",
                value=merged.seconds,
            )
            yield _gauge("loraplex_merged_adapter_bytes", "Memory held by merged copies of the weights", merged.nbytes)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running stats on LoRA requests (vLLM-compatible)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric(
            [",".join(sorted(stats.running_adapters)), ",".join(sorted(stats.waiting_adapters)), str(stats.max_loras)],
            time.time(),
        )
        yield info


def _prefix_cache_metrics(prefix: Any) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "loraplex_prefix_cache_hit_tokens", "Prompt tokens whose KV was reused from the prefix cache", value=prefix.hit_tokens
    )
    yield CounterMetricFamily(
        "loraplex_prefix_cache_miss_tokens", "Prompt tokens prefilled by the model", value=prefix.miss_tokens
    )
    yield CounterMetricFamily(
        "loraplex_prefix_cache_evictions", "Prefix-cache blocks evicted for room", value=prefix.evictions
    )
    yield CounterMetricFamily(
        "loraplex_prefix_cache_dropped_blocks",
        "Prefix-cache blocks dropped because their adapter version was released (hot swap, unload, last pin gone)",
        value=prefix.dropped_blocks,
    )
    yield _gauge("loraplex_prefix_cache_blocks", "Prefix-cache blocks kept, in cache rows and in the budget", prefix.blocks)
    yield _gauge(
        "loraplex_prefix_cache_row_blocks", "Prefix-cache blocks kept in the memory of cache rows, outside the budget",
        prefix.row_blocks,
    )
    yield _gauge("loraplex_prefix_cache_bytes", "Bytes of KV blocks kept in the prefix cache's budget", prefix.nbytes)
    yield _gauge("loraplex_prefix_cache_budget_bytes", "The prefix cache's byte budget", prefix.budget_bytes)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
