"""Micro-batching: concurrent requests for one model version run as one onnxruntime call.

grpc.aio hands handlers one request per event-loop turn, and a small model runs inline in
microseconds, so from inside the server a burst of concurrent callers looks like a sequence of
lone requests: batching only what is queued at the same instant averages ~1 request per batch.
The batcher therefore waits for company, but only where waiting has been seen to pay:

* Idle mode (the start, and concurrency 1): a request runs at once with no added wait. Every
  `PROBE_INTERVAL_S` one request waits up to `max_batch_wait_us` to see whether another arrives.
* Batching mode (entered when a wait gathered more than one request): requests queue until the
  target batch size is reached or `max_batch_wait_us` has passed. Reaching the target raises it
  by one (explore); a timeout sets it to what the wait gathered and holds it there for the next
  64 batches (so a target one above the number of callers does not make every other batch wait
  out the timeout). Two waits in a row that gather nobody return to idle mode, so a drop in load
  stops costing latency at once.

A queued request whose deadline passes, or whose caller went away, is dropped when the next batch is
taken: the model never runs for an answer nobody can receive.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gateway.errors import DeadlineExceeded, GatewayError, ModelExecutionError, Unavailable
from gateway.runtime import OnnxModel
from gateway.stats import VersionStats

COMPUTE_THREAD_NICE = 5
"""How much a model's thread defers to the event loop when both want the core: at nice 5 the loop gets
~75% of a contended core. The loop admits, refuses and answers health checks; if it waited behind
model compute, overload would queue every call before any handler could shed it (3x open-loop
overload, measured: admitted p99 1.4 s at nice 0, 70 ms at 5 and 10). Deferring further starves the
model under a retry storm (8 closed-loop callers that never back off: 150 admitted req/s at nice 0,
57 at 5, 24 at 10). An idle loop takes nothing, so a model alone still gets the whole core."""


def _yield_to_event_loop() -> None:
    """Lower this (a model's compute) thread's CPU priority below the event loop's (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPUTE_THREAD_NICE)
    except OSError:  # not permitted here: run at the same priority
        pass


Feeds = dict[str, np.ndarray]
_Results = list[list[np.ndarray] | GatewayError]  # per request of a batch: its outputs or its error
PROBE_INTERVAL_S = 0.2
IDLE_AFTER_EMPTY_WAITS = 2
EXPLORE_HOLD_BATCHES = 64


class _Pending:
    __slots__ = ("feeds", "rows", "future", "key", "queued_ns", "deadline")

    def __init__(
        self, feeds: Feeds, rows: int, future: asyncio.Future[list[np.ndarray]], deadline: float | None
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.future = future
        self.key = tuple(a.shape[1:] for a in feeds.values())
        self.queued_ns = time.perf_counter_ns()
        self.deadline = deadline  # time.monotonic() after which nobody waits for the answer; None: never


class MicroBatcher:
    """Queues requests for one model version and runs them in batches, inline or on a thread."""

    def __init__(
        self,
        model: OnnxModel,
        stats: VersionStats,
        max_batch_size: int,
        max_batch_wait_us: int,
        inline: bool,
        label: str = "",
    ) -> None:
        self._label = label  # "model 'x' version '1'", for messages
        self._model = model
        self._stats = stats
        self._max_rows = max(1, max_batch_size) if model.batchable else 1
        self._max_wait_s = max_batch_wait_us / 1e6
        self._executor = (
            None if inline else ThreadPoolExecutor(1, thread_name_prefix="onnx", initializer=_yield_to_event_loop)
        )
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # the model thread is draining the queue
        self._lock = threading.Lock()  # the queue and _busy, shared with the model thread
        self._closing = False
        self._batching = False
        self._target = 2
        self._empty_waits = 0
        self._next_probe = 0.0
        self._batches = 0  # batches that reached their target
        self._explore_after = 0

    @property
    def inline(self) -> bool:
        return self._executor is None

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not yet running)."""
        return len(self._queue)

    def _should_wait(self) -> bool:
        """Idle mode runs a request at once, except for one probe per interval."""
        if self._max_wait_s <= 0 or self._max_rows == 1:
            return False
        if self._batching:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_INTERVAL_S
        return True

    async def run(self, feeds: Feeds, rows: int, deadline: float | None = None) -> list[np.ndarray]:
        """Outputs (in signature order) for these rows; DeadlineExceeded if `deadline` (monotonic) passes
        while they wait for a batch."""
        outputs = self.submit(feeds, rows, deadline)
        return outputs if isinstance(outputs, list) else await outputs

    def submit(
        self, feeds: Feeds, rows: int, deadline: float | None = None
    ) -> list[np.ndarray] | asyncio.Future[list[np.ndarray]]:
        """`run` for the request path: the outputs when they were computed at once (inline, nothing queued),
        else a future of them. No coroutine of its own: each one a request awaits through costs it a
        frame to resume when its batch is done."""
        with self._lock:  # a model thread takes from the queue while it drains it
            starting = not self._queue
            wait = starting and rows < self._max_rows and self._should_wait()
            run_now = starting and not wait and self._executor is None
            if not run_now:
                pending = _Pending(feeds, rows, asyncio.get_running_loop().create_future(), deadline)
                self._queue.append(pending)
                self._queued_rows += rows
                if self._busy:
                    return pending.future  # the model thread takes it when its run ends
                full = not starting and self._queued_rows >= min(self._target, self._max_rows)
        if run_now:
            return self._execute_now(feeds, rows)
        if starting and not wait:
            self._flush()
        elif starting:
            self._timer = asyncio.get_running_loop().call_later(self._max_wait_s, self._on_timeout)
        elif full:
            self._batching, self._empty_waits = True, 0
            self._batches += 1
            if self._batches >= self._explore_after:
                self._target = min(self._target + 1, self._max_rows)
            self._flush()
        return pending.future

    def _on_timeout(self) -> None:
        self._timer = None
        self._stats.batch_wait_timeouts += 1
        gathered = len(self._queue)
        if gathered > 1:
            self._batching, self._empty_waits = True, 0
            self._target = max(2, min(self._queued_rows, self._max_rows))
            # The target overshot what arrives in one wait: hold it for a while before exploring again,
            # or every other batch would sit out the full wait.
            self._explore_after = self._batches + EXPLORE_HOLD_BATCHES
        else:
            self._empty_waits += 1
            if self._empty_waits >= IDLE_AFTER_EMPTY_WAITS:
                self._batching, self._target = False, 2
                self._next_probe = time.monotonic() + PROBE_INTERVAL_S
        self._flush()

    def _execute_now(self, feeds: Feeds, rows: int) -> list[np.ndarray]:
        """One request run at once, alone (the request path's common case, so one stats call)."""
        start = time.perf_counter_ns()
        try:
            outputs = self._model.run(feeds)
        except GatewayError:
            self._stats.record_execution(rows, time.perf_counter_ns() - start, ok=False)
            raise
        self._stats.record_run_alone(rows, time.perf_counter_ns() - start)
        return outputs

    def _run(self, feeds: Feeds, rows: int) -> list[np.ndarray] | GatewayError:
        """One onnxruntime call, counted as one execution."""
        start = time.perf_counter_ns()
        try:
            outputs = self._model.run(feeds)
        except GatewayError as e:
            self._stats.record_execution(rows, time.perf_counter_ns() - start, ok=False)
            return e
        self._stats.record_execution(rows, time.perf_counter_ns() - start, ok=True)
        return outputs

    def _take_batch(self) -> tuple[list[_Pending], list[_Pending]]:
        """Pop the oldest requests that share trailing shapes, up to the row limit, and those nobody waits
        for any more (deadline passed, caller gone), to be answered on the loop. Under `_lock`. The batch
        is empty only when the queue is now empty."""
        now = time.monotonic()
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        rest: list[_Pending] = []
        rows = 0
        for p in self._queue:
            if p.future.done() or (p.deadline is not None and p.deadline <= now):
                self._queued_rows -= p.rows
                expired.append(p)
            elif not batch or (p.key == batch[0].key and rows + p.rows <= self._max_rows):
                batch.append(p)
                rows += p.rows
            else:
                rest.append(p)
        self._queue = rest
        self._queued_rows -= rows
        return batch, expired

    def _expire(self, expired: list[_Pending]) -> None:
        now = time.monotonic()
        for pending in expired:
            if pending.future.done():  # cancelled: the caller's handler is gone
                continue
            waited_ms = (time.perf_counter_ns() - pending.queued_ns) / 1e6
            late_ms = (now - pending.deadline) * 1e3 if pending.deadline is not None else 0.0
            pending.future.set_exception(
                DeadlineExceeded(
                    f"deadline: passed while queued for {self._label or 'the model'} "
                    f"(queued {waited_ms:.1f} ms, {late_ms:.1f} ms late); not run",
                    limit="deadline",
                )
            )

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while True:
            with self._lock:
                if self._busy:
                    return  # the model thread takes the queue when its run ends
                batch, expired = self._take_batch()
                closing = self._closing
                self._busy = bool(batch) and self._executor is not None and not closing
            self._expire(expired)
            if not batch:
                return
            if self._executor is None:
                self._complete(batch, self._execute_batch(batch))
                continue
            if not closing:
                try:
                    self._executor.submit(self._drain, batch, asyncio.get_running_loop())
                    return
                except RuntimeError:  # the executor is shut down (the interpreter is exiting)
                    with self._lock:
                        self._busy = False
            closed = Unavailable(f"{self._label or 'the model'} is shut down; not run")
            self._complete(batch, [closed for _ in batch])

    def _drain(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        """On the model thread: run `batch`, then whatever queued meanwhile, back to back. The model does
        not wait for the event loop between runs: under overload the loop is busy refusing calls, and a
        run it had to start would wait behind all of them."""
        while batch:
            results = self._execute_batch(batch)
            with self._lock:
                following, expired = ([], []) if self._closing else self._take_batch()
                self._busy = bool(following)
            try:
                loop.call_soon_threadsafe(self._finish, batch, results, expired)
            except RuntimeError:  # the loop is closed: nobody is left to answer what it queued
                with self._lock:
                    self._queue = [p for p in self._queue if p.future.get_loop() is not loop]
                    self._queued_rows = sum(p.rows for p in self._queue)
                    self._busy = False  # a later loop's requests start the thread again
                return
            batch = following

    def _finish(self, batch: list[_Pending], results: _Results, expired: list[_Pending]) -> None:
        """On the loop: answer a batch the model thread ran (and those that expired while it ran)."""
        self._complete(batch, results)
        self._expire(expired)
        if self._closing and self._queue:
            self._flush()  # refuses what the model thread left when the batcher closed

    def _execute_batch(self, batch: list[_Pending]) -> _Results:
        """Each request's outputs or error; never raises, so no caller of the batch is left waiting."""
        try:
            return self._execute_merged(batch)
        except Exception as e:  # a failure outside the model run must still answer every caller
            error = ModelExecutionError(f"model execution failed: batch of {len(batch)} requests: {e!r}")
            return [error for _ in batch]

    def _execute_merged(self, batch: list[_Pending]) -> _Results:
        """Run a batch; on failure rerun each request alone so only the culprit fails."""
        started = time.perf_counter_ns()
        rows = [p.rows for p in batch]
        total = sum(rows)
        merged: list[np.ndarray] | GatewayError
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        except Exception as e:  # feeds that do not stack (other input names, say): each runs alone below
            merged_at = time.perf_counter_ns()
            merged = ModelExecutionError(f"model execution failed: the batch's inputs cannot be merged: {e!r}")
        else:
            merged_at = time.perf_counter_ns()
            merged = self._run(feeds, total)
        ran_at = time.perf_counter_ns()
        results: _Results
        if isinstance(merged, GatewayError):
            results = [merged] if len(batch) == 1 else [self._run(p.feeds, p.rows) for p in batch]
        elif len(batch) == 1:
            results = [merged]
        elif any(o.shape[:1] != (total,) for o in merged):
            error = ModelExecutionError("model output batch dimension does not match its input batch")
            results = [error for _ in batch]
        else:
            offsets = itertools.accumulate(rows)  # plain ints: np.cumsum costs more for a handful
            results = [[o[end - n : end] for o in merged] for n, end in zip(rows, offsets, strict=True)]
        done_at = time.perf_counter_ns()
        for p in batch:
            self._stats.record_compute(started - p.queued_ns, merged_at - started, ran_at - merged_at, done_at - ran_at)
        return results

    @staticmethod
    def _complete(batch: list[_Pending], results: _Results) -> None:
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():  # the caller went away (cancelled)
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def close(self) -> None:
        """Finish the running batch; what is still queued is refused (UNAVAILABLE), not run."""
        with self._lock:
            self._closing = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
