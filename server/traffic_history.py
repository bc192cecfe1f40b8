"""The last minutes of traffic, for the dashboard: a ring of periodic snapshots of the server's
own Prometheus counters and histograms (the ones `/metrics` exposes), so the page and a scraper
can never disagree. Rates are counter differences over time; latency quantiles are estimated
from histogram bucket differences, as Prometheus' `histogram_quantile` does."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics import MetricWrapperBase

from server.engine import EngineStats
from server.metrics import LATENCY_BUCKETS, ServerMetrics

# Cumulative observation counts per bucket of LATENCY_BOUNDS (both latency histograms use them).
# Bounds are kept once, not per snapshot: the ring holds minutes of snapshots of every adapter.
Buckets = tuple[int, ...]
LATENCY_BOUNDS = (*LATENCY_BUCKETS, math.inf)


@dataclass
class Counts:
    """Cumulative figures of one adapter or task at one instant."""

    requests: float = 0.0
    generation_tokens: float = 0.0
    rejected: float = 0.0  # 429s (queue full)
    ttft: Buckets = ()
    e2e: Buckets = ()


@dataclass
class Load:
    """The engine's occupancy at one instant (from `Engine.stats()`)."""

    queued: int
    running: int
    slots_used: int


@dataclass
class Snapshot:
    at: float  # time.monotonic()
    wall: float  # time.time(), for the page's axis
    adapters: dict[str, Counts]
    tasks: dict[str, Counts]
    arms: dict[str, dict[str, float]]  # task -> adapter -> requests routed there through the task
    load: Load | None  # None before the engine has started


@dataclass
class Window:
    """Figures of one adapter or task over a stretch of time."""

    requests_per_s: float
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p95: float | None
    e2e_p50: float | None
    e2e_p95: float | None


class TrafficHistory:
    def __init__(
        self,
        metrics: ServerMetrics,
        stats_source: Callable[[], EngineStats | None],
        interval_s: float = 5.0,
        window_s: float = 300.0,
    ) -> None:
        self.metrics = metrics
        self.stats_source = stats_source
        self.interval_s = interval_s
        self.window_s = window_s
        self._ring: deque[Snapshot] = deque(maxlen=max(2, math.ceil(window_s / interval_s) + 1))
        self.last_request_wall: dict[str, float] = {}  # adapter -> wall time its request count last grew

    def sample(self) -> Snapshot:
        """Read the counters now and keep the snapshot in the ring."""
        snapshot = self.read()
        previous = self._ring[-1] if self._ring else None
        for name, counts in snapshot.adapters.items():
            before = previous.adapters.get(name) if previous else None
            if counts.requests > (before.requests if before else 0.0):
                self.last_request_wall[name] = snapshot.wall
        if previous is not None:  # idle names share one object across snapshots
            for kind in ("adapters", "tasks"):
                table, old = getattr(snapshot, kind), getattr(previous, kind)
                for name, counts in table.items():
                    if old.get(name) == counts:
                        table[name] = old[name]
        self._ring.append(snapshot)
        return snapshot

    def snapshots(self) -> list[Snapshot]:
        return list(self._ring)

    def read(self) -> Snapshot:
        m = self.metrics
        adapters: dict[str, Counts] = {}
        tasks: dict[str, Counts] = {}

        def counts(table: dict[str, Counts], name: str) -> Counts:
            return table.setdefault(name, Counts())

        for labels, value in _counter_values(m.requests):
            counts(adapters, labels["adapter"]).requests += value
        for labels, value in _counter_values(m.generation_tokens):
            counts(adapters, labels["adapter"]).generation_tokens += value
        for labels, value in _counter_values(m.errors):
            if labels["status"] == "429":
                counts(adapters, labels["adapter"]).rejected += value
        for name, buckets in _histogram_buckets(m.ttft, "adapter").items():
            counts(adapters, name).ttft = buckets
        for name, buckets in _histogram_buckets(m.e2e, "adapter").items():
            counts(adapters, name).e2e = buckets
        arms: dict[str, dict[str, float]] = {}
        for labels, value in _counter_values(m.task_requests):
            counts(tasks, labels["task"]).requests += value
            arms.setdefault(labels["task"], {})[labels["adapter"]] = value
        for labels, value in _counter_values(m.task_generation_tokens):
            counts(tasks, labels["task"]).generation_tokens += value
        for name, buckets in _histogram_buckets(m.task_ttft, "task").items():
            counts(tasks, name).ttft = buckets
        for name, buckets in _histogram_buckets(m.task_e2e, "task").items():
            counts(tasks, name).e2e = buckets
        stats = self.stats_source()
        load = Load(stats.queued, stats.running, len(stats.resident)) if stats is not None else None
        return Snapshot(at=time.monotonic(), wall=time.time(), adapters=adapters, tasks=tasks, arms=arms, load=load)


def window(before: Counts | None, after: Counts, seconds: float) -> Window:
    """The figures between two snapshots of one adapter or task (`before` None = from zero)."""
    before = before or Counts()
    seconds = max(seconds, 1e-9)
    ttft = _bucket_difference(after.ttft, before.ttft)
    e2e = _bucket_difference(after.e2e, before.e2e)
    return Window(
        requests_per_s=(after.requests - before.requests) / seconds,
        tokens_per_s=(after.generation_tokens - before.generation_tokens) / seconds,
        ttft_p50=bucket_quantile(0.5, ttft),
        ttft_p95=bucket_quantile(0.95, ttft),
        e2e_p50=bucket_quantile(0.5, e2e),
        e2e_p95=bucket_quantile(0.95, e2e),
    )


def bucket_quantile(q: float, buckets: Buckets, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly within its bucket (as
    Prometheus does); None without observations. Past the last finite bound: that bound."""
    if not buckets or buckets[-1] <= 0:
        return None
    rank = q * buckets[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, buckets):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _bucket_difference(after: Buckets, before: Buckets) -> Buckets:
    if not before:
        return after
    return tuple(count - old for count, old in zip(after, before))


def _counter_values(metric: MetricWrapperBase) -> Iterable[tuple[dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value


def _histogram_buckets(metric: MetricWrapperBase, label: str) -> dict[str, Buckets]:
    found: dict[str, dict[float, int]] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                found.setdefault(sample.labels[label], {})[float(sample.labels["le"])] = int(sample.value)
    return {name: tuple(counts[bound] for bound in LATENCY_BOUNDS) for name, counts in found.items()}


@dataclass
class Series:
    """Per-interval figures of one adapter or task, oldest first, for the page's small charts."""

    wall: list[float] = field(default_factory=list)
    requests_per_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    ttft_p50: list[float | None] = field(default_factory=list)
    ttft_p95: list[float | None] = field(default_factory=list)
    e2e_p50: list[float | None] = field(default_factory=list)
    e2e_p95: list[float | None] = field(default_factory=list)


def series(snapshots: list[Snapshot], name: str, kind: str) -> Series:
    """`kind` is "adapters" or "tasks"."""
    result = Series()
    for before, after in zip(snapshots, snapshots[1:]):
        now = getattr(after, kind).get(name)
        if now is None:
            continue
        figures = window(getattr(before, kind).get(name), now, after.at - before.at)
        result.wall.append(after.wall)
        result.requests_per_s.append(figures.requests_per_s)
        result.tokens_per_s.append(figures.tokens_per_s)
        result.ttft_p50.append(figures.ttft_p50)
        result.ttft_p95.append(figures.ttft_p95)
        result.e2e_p50.append(figures.e2e_p50)
        result.e2e_p95.append(figures.e2e_p95)
    return result


def load_series(snapshots: list[Snapshot]) -> dict[str, list[float]]:
    """Queue depth, running rows and slots in use at each snapshot, for the summary's charts."""
    sampled = [s for s in snapshots if s.load is not None]
    return {
        "wall": [s.wall for s in sampled],
        "queued": [s.load.queued for s in sampled],
        "running": [s.load.running for s in sampled],
        "slots_used": [s.load.slots_used for s in sampled],
    }
