"""Per-version counters that back the ModelStatistics RPC (Triton's statistics extension)."""

from __future__ import annotations

import time
from typing import NamedTuple


class Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


class VersionStats:
    """Counters for one model version; updated on the event loop or the version's one thread."""

    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0  # rows answered
        self.execution_count = 0  # onnxruntime runs
        self.success = Duration()
        self.fail = Duration()
        # Per request, as Triton counts them (perf_analyzer requires equal counts): time queued
        # in the batcher, merging inputs, the onnxruntime run of its batch, splitting outputs.
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batch_sizes: dict[int, Duration] = {}
        self.batch_wait_timeouts = 0  # batches flushed because max_batch_wait_us passed

    def record_execution(self, rows: int, ns: int, ok: bool) -> None:
        self.execution_count += 1
        if ok:
            self.batch_sizes.setdefault(rows, Duration()).add(ns)

    def record_compute(self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_request(self, rows: int, ns: int, ok: bool) -> None:
        if ok:
            self.inference_count += rows
            self.success.add(ns)
        else:
            self.fail.add(ns)
        self.last_inference_ms = time.time_ns() // 1_000_000


class RecentRequests:
    """The last `size` requests of one (model, version, role): what `canary-gateway status` summarises.

    A ring of plain lists (a few index stores per request, no allocation) read only when an operator asks.
    """

    __slots__ = ("_ended_ns", "_latency_ns", "_ok", "_ood", "_next", "_size", "_first_ns")

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._ended_ns = [0] * size
        self._latency_ns = [0] * size
        self._ok = [False] * size
        self._ood: list[bool | None] = [None] * size  # None: not scored
        self._next = 0
        self._first_ns = 0

    def add(self, ended_ns: int, latency_ns: int, ok: bool, ood: bool | None) -> None:
        i = self._next % self._size
        if not self._next:
            self._first_ns = ended_ns
        self._ended_ns[i] = ended_ns
        self._latency_ns[i] = latency_ns
        self._ok[i] = ok
        self._ood[i] = ood
        self._next += 1

    def summary(self, now_ns: int, window_s: float) -> TrafficSummary:
        since = now_ns - int(window_s * 1e9)
        kept = min(self._next, self._size)
        chosen = [i for i in range(kept) if self._ended_ns[i] > since]
        if not chosen:
            return TrafficSummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        latencies = sorted(self._latency_ns[i] for i in chosen)
        scored = [self._ood[i] for i in chosen if self._ood[i] is not None]
        # The rate is over the window, or over less when traffic started later or the ring wrapped within it.
        start = self._first_ns if kept < self._size else min(self._ended_ns[i] for i in chosen)
        span_s = max((now_ns - max(since, start)) / 1e9, 1e-3)
        n = len(chosen)
        return TrafficSummary(
            requests=n,
            rate_per_s=n / span_s,
            error_rate=sum(not self._ok[i] for i in chosen) / n,
            p50_ms=latencies[(n - 1) // 2] / 1e6,
            p99_ms=latencies[min(n - 1, int(0.99 * n))] / 1e6,
            ood_rate=sum(bool(flag) for flag in scored) / len(scored) if scored else 0.0,
            scored=len(scored),
        )


class TrafficSummary(NamedTuple):
    requests: int
    rate_per_s: float
    error_rate: float
    p50_ms: float
    p99_ms: float
    ood_rate: float
    scored: int


class Traffic:
    """RecentRequests per (model, version, role), fed with every logged request."""

    def __init__(self) -> None:
        self.recent: dict[tuple[str, str, str], RecentRequests] = {}

    def add(self, model: str, version: str, role: str, latency_ns: int, ok: bool, ood: bool | None) -> None:
        key = (model, version, role)
        recent = self.recent.get(key)
        if recent is None:
            recent = self.recent[key] = RecentRequests()
        recent.add(time.time_ns(), latency_ns, ok, ood)
