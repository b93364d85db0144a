"""Per-version counters: ModelStatistics (Triton's statistics extension), the recent-traffic ring behind
`canary-gateway status`, and the cumulative counts a rollout diffs over a step's window."""

from __future__ import annotations

import time
from typing import NamedTuple

LATENCY_SUB_BUCKETS = 8
"""Latency histogram resolution: 8 buckets per power of two, so a bucket is at most 12.5% wide."""
LATENCY_BUCKETS = 16 + 60 * LATENCY_SUB_BUCKETS  # exact below 16 ns; up to 2**64 ns


def latency_bucket(ns: int) -> int:
    """The histogram bucket of a latency: a few integer operations, cheap enough for every request."""
    if ns < 16:
        return max(ns, 0)
    shift = ns.bit_length() - 4  # keep the top 4 bits: 8..15
    return 16 + (shift - 1) * LATENCY_SUB_BUCKETS + (ns >> shift) - 8


def quantile_rank(q: float, n: int) -> int:
    """The 1-based rank of the q-quantile of n sorted values: ceil(q * n), at least 1.

    Shared by the histogram (Counts, the worker board) and the single-process ring (RecentRequests), so
    `canary-gateway status` reads the same quantile with one process or several workers.
    """
    return max(1, -(-int(q * n * 1_000_000) // 1_000_000))  # ceil(q * n), without float drift


def bucket_upper_ns(bucket: int) -> int:
    """The largest latency that falls into `bucket` (quantiles are read as this bound)."""
    if bucket < 16:
        return bucket
    shift, top = divmod(bucket - 16, LATENCY_SUB_BUCKETS)
    return ((top + 9) << (shift + 1)) - 1


class Counts(NamedTuple):
    """Cumulative figures of one (model, version, role) since the gateway started; `since` makes a window."""

    requests: int = 0
    errors: int = 0
    ood_scored: int = 0
    ood_flagged: int = 0
    latency: tuple[int, ...] = ()  # answered (OK) requests per latency_bucket: failures have their own gate

    def since(self, earlier: Counts) -> Counts:
        """The figures of the requests counted after `earlier` was taken."""
        old = earlier.latency or (0,) * len(self.latency)
        return Counts(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            self.ood_scored - earlier.ood_scored,
            self.ood_flagged - earlier.ood_flagged,
            tuple(a - b for a, b in zip(self.latency, old, strict=True)) if self.latency else (),
        )

    def answered_slower_than_ms(self, limit_ms: float) -> int:
        """Answers surely slower than `limit_ms`: those in buckets that start above it."""
        limit_ns = limit_ms * 1e6
        latency = self.latency
        return sum(count for b, count in enumerate(latency) if b and bucket_upper_ns(b - 1) >= limit_ns)

    def summary(self, span_s: float) -> TrafficSummary:
        """These counts as a status line over `span_s` seconds (latency quantiles of answered requests)."""
        n = self.requests
        if not n:
            return TrafficSummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        return TrafficSummary(
            requests=n,
            rate_per_s=n / max(span_s, 1e-3),
            error_rate=self.errors / n,
            p50_ms=self.latency_quantile_ms(0.5),
            p99_ms=self.latency_quantile_ms(0.99),
            ood_rate=self.ood_flagged / self.ood_scored if self.ood_scored else 0.0,
            scored=self.ood_scored,
        )

    def latency_quantile_ms(self, q: float) -> float:
        """The q-quantile of latency in ms, read as its bucket's upper bound (0.0 without requests)."""
        total = sum(self.latency)
        if not total:
            return 0.0
        rank = quantile_rank(q, total)
        seen = 0
        for bucket, count in enumerate(self.latency):
            seen += count
            if seen >= rank:
                return bucket_upper_ns(bucket) / 1e6
        return bucket_upper_ns(len(self.latency) - 1) / 1e6


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
        self.ok_runs = Duration()  # the runs that succeeded, whatever their batch size
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
            self.ok_runs.add(ns)

    def record_run_alone(self, rows: int, ns: int) -> None:
        """`record_execution` (ok) and `record_compute(0, 0, ns, 0)` of a request run at once, alone:
        the request path's one stats call, its additions inline."""
        self.execution_count += 1
        batch = self.batch_sizes.get(rows)
        if batch is None:
            batch = self.batch_sizes[rows] = Duration()
        batch.count += 1
        batch.ns += ns
        runs, infer = self.ok_runs, self.compute_infer
        runs.count += 1
        runs.ns += ns
        infer.count += 1
        infer.ns += ns
        self.queue.count += 1
        self.compute_input.count += 1
        self.compute_output.count += 1

    def mean_run_ms(self) -> float:
        """How long a run has taken on average (0 before the first)."""
        return self.ok_runs.ns / self.ok_runs.count / 1e6 if self.ok_runs.count else 0.0

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

    A ring of plain lists (a few index stores per request, no allocation) read only when an operator asks,
    and cumulative counters (a few integer updates) that a rollout reads at a step's start and end.
    """

    __slots__ = (
        "_ended_ns",
        "_latency_ns",
        "_ok",
        "_ood",
        "_next",
        "_size",
        "_first_ns",
        "_errors",
        "_ood_scored",
        "_ood_flagged",
        "_latency_hist",
    )

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._ended_ns = [0] * size
        self._latency_ns = [0] * size
        self._ok = [False] * size
        self._ood: list[bool | None] = [None] * size  # None: not scored
        self._next = 0  # also the cumulative request count
        self._first_ns = 0
        self._errors = 0
        self._ood_scored = 0
        self._ood_flagged = 0
        self._latency_hist = [0] * LATENCY_BUCKETS

    def add(self, ended_ns: int, latency_ns: int, ok: bool, ood: bool | None) -> None:
        i = self._next % self._size
        if not self._next:
            self._first_ns = ended_ns
        self._ended_ns[i] = ended_ns
        self._latency_ns[i] = latency_ns
        self._ok[i] = ok
        self._ood[i] = ood
        self._next += 1
        if ok:
            self._latency_hist[latency_bucket(latency_ns)] += 1
        else:
            self._errors += 1
        if ood is not None:
            self._ood_scored += 1
            self._ood_flagged += ood

    def counts(self) -> Counts:
        """The cumulative counters, copied (read on the event loop, so consistent)."""
        return Counts(self._next, self._errors, self._ood_scored, self._ood_flagged, tuple(self._latency_hist))

    def summary(self, now_ns: int, window_s: float) -> TrafficSummary:
        since = now_ns - int(window_s * 1e9)
        kept = min(self._next, self._size)
        chosen = [i for i in range(kept) if self._ended_ns[i] > since]
        if not chosen:
            return TrafficSummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        # Answered requests only, as in the histogram behind Counts.summary (what a rollout judges):
        # a failure's latency (often a fast refusal) is in the error rate, not the quantiles.
        latencies = sorted(self._latency_ns[i] for i in chosen if self._ok[i])
        scored = [self._ood[i] for i in chosen if self._ood[i] is not None]
        # The rate is over the window, or over less when traffic started later or the ring wrapped within it.
        start = self._first_ns if kept < self._size else min(self._ended_ns[i] for i in chosen)
        span_s = max((now_ns - max(since, start)) / 1e9, 1e-3)
        n = len(chosen)
        return TrafficSummary(
            requests=n,
            rate_per_s=n / span_s,
            error_rate=sum(not self._ok[i] for i in chosen) / n,
            p50_ms=latencies[quantile_rank(0.5, len(latencies)) - 1] / 1e6 if latencies else 0.0,
            p99_ms=latencies[quantile_rank(0.99, len(latencies)) - 1] / 1e6 if latencies else 0.0,
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

    def counts(self, model: str, version: str, role: str) -> Counts:
        """Cumulative figures of (model, version, role); zeros before its first request."""
        recent = self.recent.get((model, version, role))
        return Counts() if recent is None else recent.counts()

    def all_counts(self) -> dict[tuple[str, str, str], Counts]:
        return {key: recent.counts() for key, recent in list(self.recent.items())}

    def summaries(self, now_ns: int, window_s: float) -> dict[tuple[str, str, str], TrafficSummary]:
        """Each (model, version, role)'s requests that ended in the last `window_s` seconds, summarised."""
        return {key: recent.summary(now_ns, window_s) for key, recent in sorted(self.recent.items())}
