"""Latency histograms in microseconds, one shape for every measurement in loadtests/.

Every figure we compare (onnxruntime direct, the floors, the gateway) must come from histograms with
the same range and precision, or their percentiles would not be comparable; HDR histograms also merge
exactly, which lets the load generator's processes each keep their own and add them up at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000  # one minute: anything slower is a hang, not a latency
SIGNIFICANT_FIGURES = 3


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_ns(histogram: HdrHistogram, ns: int) -> None:
    """Record a duration measured in nanoseconds, rounded to the nearest microsecond and clamped into range."""
    histogram.record_value(min(max((ns + 500) // 1000, LOWEST_US), HIGHEST_US))


@dataclass(frozen=True)
class Latency:
    count: int
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int

    @classmethod
    def of(cls, histogram: HdrHistogram) -> Latency:
        return cls(
            count=histogram.get_total_count(),
            mean_us=round(histogram.get_mean_value(), 1),
            p50_us=histogram.get_value_at_percentile(50),
            p90_us=histogram.get_value_at_percentile(90),
            p99_us=histogram.get_value_at_percentile(99),
            max_us=histogram.get_max_value(),
        )
