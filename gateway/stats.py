"""Per-version counters that back the ModelStatistics RPC (Triton's statistics extension)."""

from __future__ import annotations

import time


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
