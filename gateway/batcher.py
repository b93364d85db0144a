"""Micro-batching: concurrent requests for one model version run as one onnxruntime call.

grpc.aio hands handlers one request per event-loop turn, so batching only what is queued at the
same instant averages ~1 request per batch. The batcher therefore waits, but only while it
expects company: the target batch is the peak number of concurrent callers seen recently, and a
batch is flushed as soon as that many requests are queued or `max_batch_wait_us` has passed. At
concurrency 1 the target is 1 and a request runs at once, with no added wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gateway.errors import GatewayError, ModelExecutionError
from gateway.runtime import OnnxModel
from gateway.stats import VersionStats

Feeds = dict[str, np.ndarray]
PEAK_WINDOW_S = 0.05


class _Pending:
    __slots__ = ("feeds", "rows", "future", "key")

    def __init__(self, feeds: Feeds, rows: int, future: asyncio.Future[list[np.ndarray]]) -> None:
        self.feeds = feeds
        self.rows = rows
        self.future = future
        self.key = tuple(a.shape[1:] for a in feeds.values())


class MicroBatcher:
    """Queues requests for one model version and runs them in batches, inline or on a thread."""

    def __init__(
        self,
        model: OnnxModel,
        stats: VersionStats,
        max_batch_size: int,
        max_batch_wait_us: int,
        inline: bool,
    ) -> None:
        self._model = model
        self._stats = stats
        self._max_rows = max(1, max_batch_size) if model.batchable else 1
        self._max_wait_s = max_batch_wait_us / 1e6
        self._executor = None if inline else ThreadPoolExecutor(1, thread_name_prefix="onnx")
        self._queue: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a threaded run is in progress
        self._inflight = 0
        self._peak = 1
        self._previous_peak = 1
        self._window_end = 0.0

    @property
    def inline(self) -> bool:
        return self._executor is None

    def _target(self) -> int:
        now = time.monotonic()
        if now >= self._window_end:
            self._previous_peak, self._peak = self._peak, self._inflight
            self._window_end = now + PEAK_WINDOW_S
        elif self._inflight > self._peak:
            self._peak = self._inflight
        return min(max(self._peak, self._previous_peak), self._max_rows)

    async def run(self, feeds: Feeds, rows: int) -> list[np.ndarray]:
        """Outputs (in signature order) for these rows."""
        self._inflight += 1
        try:
            target = self._target()
            if self.inline and not self._queue and (target <= 1 or rows >= self._max_rows):
                return self._execute_now(feeds, rows)
            loop = asyncio.get_running_loop()
            pending = _Pending(feeds, rows, loop.create_future())
            self._queue.append(pending)
            queued_rows = sum(p.rows for p in self._queue)
            if queued_rows >= target or queued_rows >= self._max_rows:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self._max_wait_s, self._flush)
            return await pending.future
        finally:
            self._inflight -= 1

    def _execute_now(self, feeds: Feeds, rows: int) -> list[np.ndarray]:
        start = time.perf_counter_ns()
        try:
            outputs = self._model.run(feeds)
        except GatewayError:
            self._stats.record_execution(rows, time.perf_counter_ns() - start, ok=False)
            raise
        self._stats.record_execution(rows, time.perf_counter_ns() - start, ok=True)
        return outputs

    def _take_batch(self) -> list[_Pending]:
        """Pop the oldest requests that share trailing shapes, up to the row limit."""
        first = self._queue[0]
        batch, rest, rows = [], [], 0
        for p in self._queue:
            if p.key == first.key and rows + p.rows <= self._max_rows or not batch:
                batch.append(p)
                rows += p.rows
            else:
                rest.append(p)
        self._queue = rest
        return batch

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            return  # the running batch flushes the queue when it finishes
        while self._queue:
            batch = self._take_batch()
            if self._executor is None:
                self._complete(batch, self._execute_batch(batch))
            else:
                self._busy = True
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(self._executor, self._execute_batch, batch)
                job.add_done_callback(self._threaded_done(batch))
                return

    def _threaded_done(self, batch: list[_Pending]) -> Callable[[asyncio.Future[object]], None]:
        def done(job: asyncio.Future[object]) -> None:
            self._busy = False
            self._complete(batch, job.result())  # type: ignore[arg-type]
            if self._queue:
                self._flush()

        return done

    def _execute_batch(self, batch: list[_Pending]) -> list[list[np.ndarray] | BaseException]:
        """Run a batch; on failure rerun each request alone so only the culprit fails."""
        if len(batch) == 1:
            return [self._try(batch[0].feeds, batch[0].rows)]
        rows = [p.rows for p in batch]
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        merged = self._try(feeds, sum(rows))
        if isinstance(merged, BaseException):
            return [self._try(p.feeds, p.rows) for p in batch]
        if any(o.shape[:1] != (sum(rows),) for o in merged):
            error = ModelExecutionError("model output batch dimension does not match its input batch")
            return [error for _ in batch]
        results: list[list[np.ndarray] | BaseException] = []
        offset = 0
        for n in rows:
            results.append([o[offset : offset + n] for o in merged])
            offset += n
        return results

    def _try(self, feeds: Feeds, rows: int) -> list[np.ndarray] | BaseException:
        try:
            return self._execute_now(feeds, rows)
        except GatewayError as e:
            return e

    @staticmethod
    def _complete(batch: list[_Pending], results: list[list[np.ndarray] | BaseException]) -> None:
        for pending, result in zip(batch, results):
            if pending.future.done():  # the caller went away (cancelled)
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
