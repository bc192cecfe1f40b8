"""Latency quantiles from a fixed log-spaced histogram: a few hundred counters per arm, cheap to
persist, with quantiles accurate to one bin (12% of the value)."""

from __future__ import annotations

import math

MIN_S = 1e-3  # faster than a millisecond lands in bin 0
BINS_PER_DECADE = 20
DECADES = 6  # 1 ms .. 1000 s
BIN_COUNT = BINS_PER_DECADE * DECADES + 1  # the last bin takes everything slower


def bin_of(seconds: float) -> int:
    if seconds <= MIN_S:
        return 0
    return min(BIN_COUNT - 1, 1 + int(math.log10(seconds / MIN_S) * BINS_PER_DECADE))


def bin_upper_s(index: int) -> float:
    return MIN_S * 10 ** (index / BINS_PER_DECADE)


def quantile(counts: dict[int, int], q: float) -> float | None:
    """The upper edge of the bin holding the q-quantile (None with no observations)."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return bin_upper_s(index)
    return bin_upper_s(max(counts))
