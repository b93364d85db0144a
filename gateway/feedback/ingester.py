"""Feedback ingest in a child process at the lowest CPU priority: it gets the CPU inference leaves idle.

Checking a batch, looking its ids up in the request log and writing the truth costs ~2 µs of CPU per
record in Python and py-lmdb, a tenth of a core at 50,000 records/s. On a worker thread of the gateway
that tenth came out of inference (one GIL, one serving core): bench_feedback measured 0.73-0.80×
inference throughput. A serving core is not busy all the time, though: it idles between requests, and a
low-priority CPU hog on the gateway's CPU cost inference throughput nothing in an interleaved diagnostic.
So the ingest runs in its own process under SCHED_IDLE by default (`feedback.ingest_priority`).
Not nice 19: gRPC's transport threads run under SCHED_BATCH (gateway/scheduling.py), and a waking
SCHED_BATCH thread does not preempt even a nice-19 process, so one request in flight waited out the
hog's time slice (c1 p50 0.8 -> 4.0 ms in a diagnostic). Every waking thread preempts a SCHED_IDLE one.
It may run on any CPU by default (`feedback.ingest_cpus`), even when the gateway is pinned: confined to
a fully loaded serving CPU it got ~25,000 records/s, while the machine's other CPU sat ~40% idle.

The child opens the request log read-only and the feedback store for writing (LMDB serialises writers
across processes; the gateway's own handle on the store reads what the child commits). It is started on
the first batch, so a gateway that never receives feedback pays nothing, and restarted if it dies."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError, Unavailable
from gateway.feedback import ingest
from gateway.feedback.store import FeedbackStore
from gateway.requestlog.reader import LogReader

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
STOPPING = "feedback: the gateway is stopping; resend the batch to a running one"
ANSWER_TIMEOUT_S = 120.0  # a batch of thousands takes milliseconds; SCHED_IDLE under full load, seconds


class IngestProcess:
    """One batch at a time through a pipe to the child (it is serial anyway). `submit_async` queues
    batches for one thread of its own, so waiting batches never occupy asyncio's shared thread pool,
    even once their callers have gone (a cancelled call's batch still runs if it had started)."""

    def __init__(
        self, log_dir: Path, feedback_dir: Path, priority: str | int = "idle", cpus: str | tuple[int, ...] = "any"
    ) -> None:
        self._dirs = (log_dir, feedback_dir)
        self._priority = priority
        self._cpus = cpus
        self._lock = threading.Lock()
        self._child: Any = None  # a multiprocessing Process (spawn context)
        self._pipe: Connection | None = None
        self._turns = ThreadPoolExecutor(1, thread_name_prefix="feedback-ingest")
        self._closed = False

    async def submit_async(self, model: str, task: str, request: Any) -> ingest.Outcome:
        """`submit` for a SubmitFeedbackRequest message, serialized on the ingest thread, not the loop."""
        if self._closed:
            raise Unavailable(STOPPING)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._turns, lambda: self.submit(model, task, request.SerializeToString()))

    def submit(self, model: str, task: str, request: bytes) -> ingest.Outcome:
        """Check and store one serialized SubmitFeedbackRequest; blocks until the child answers."""
        with self._lock:
            if self._closed:
                raise Unavailable(STOPPING)
            pipe = self._pipe if self.alive else None
            if pipe is None:
                pipe = self._start()
            try:
                pipe.send((model, task, request))
                if not pipe.poll(ANSWER_TIMEOUT_S):
                    raise TimeoutError(f"no answer in {ANSWER_TIMEOUT_S:.0f} s")
                answer = pipe.recv()
            except (EOFError, OSError) as e:  # TimeoutError is an OSError
                self._stop()
                raise Unavailable(
                    f"feedback ingest process failed ({e!r}): this batch may not be stored; "
                    "truth is idempotent, so resend it"
                ) from e
        if isinstance(answer, GatewayError):
            raise answer
        assert isinstance(answer, ingest.Outcome)
        return answer

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def alive(self) -> bool:
        return self._child is not None and bool(self._child.is_alive())

    def close(self) -> None:
        """Stop the child: at once if a batch is still running after STOP_TIMEOUT_S (LMDB aborts its
        transaction), so a starved or stuck child never holds up the gateway's shutdown."""
        self._closed = True
        if not self._lock.acquire(timeout=STOP_TIMEOUT_S):
            child = self._child
            if child is not None:
                child.kill()  # the waiting submit sees the pipe close, answers UNAVAILABLE, lets go
            self._lock.acquire()
        try:
            self._stop()
        finally:
            self._lock.release()
        self._turns.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> Connection:
        self._stop()
        # spawn, not fork: the gateway runs gRPC's threads, which a forked child would inherit broken
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._child = context.Process(
            target=_serve, args=(child, *self._dirs, self._priority, self._cpus), name="feedback-ingest", daemon=True
        )
        self._child.start()
        child.close()
        self._pipe = parent
        log.info(
            "feedback ingest process %d started (CPU priority %s, CPUs %s)", self._child.pid, self._priority, self._cpus
        )
        return parent

    def _stop(self) -> None:
        if self._pipe is not None:
            try:
                self._pipe.send(None)
            except OSError:
                pass  # already gone
            self._pipe.close()
            self._pipe = None
        if self._child is not None:
            self._child.join(STOP_TIMEOUT_S)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            self._child = None


def _lower_priority(priority: str | int) -> None:
    idle = getattr(os, "SCHED_IDLE", None)  # Linux
    if priority == "idle" and idle is not None:
        os.sched_setscheduler(0, idle, os.sched_param(0))
    else:
        nice = 19 if priority == "idle" else int(priority)
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))  # never above the gateway


def _place(cpus: str | tuple[int, ...]) -> None:
    """Move the child to the CPUs `feedback.ingest_cpus` names. It starts on the gateway's: a gateway pinned
    to its serving CPUs (`taskset`) would otherwise keep the ingest where it only gets what serving leaves."""
    if cpus == "gateway":
        return
    wanted = range(os.cpu_count() or 1) if isinstance(cpus, str) else cpus  # "any"
    try:
        os.sched_setaffinity(0, wanted)  # the kernel keeps it within the CPUs a cgroup's cpuset allows
    except OSError as e:
        log.warning("feedback ingest: cannot run on CPUs %s (%s); staying on %s", cpus, e, os.sched_getaffinity(0))


def _serve(
    pipe: Connection, log_dir: Path, feedback_dir: Path, priority: str | int, cpus: str | tuple[int, ...]
) -> None:
    """The child: batches in, outcomes (or the GatewayError that refused the batch) out, until None."""
    _lower_priority(priority)
    _place(cpus)
    from gateway.protocol import admin as pb  # imported here: the child needs the messages, not the server

    reader, store = LogReader(log_dir), FeedbackStore(feedback_dir)
    try:
        while (work := pipe.recv()) is not None:
            model, task, raw = work
            try:
                request = pb.SubmitFeedbackRequest.FromString(raw)
                columns = request.columns if request.HasField("columns") else None
                answer: Any = ingest.submit(store, reader, model, task, request.entries, columns)
            except GatewayError as e:
                answer = e
            except Exception as e:  # disk full, I/O error...: answer it, do not die and be respawned per batch
                log.exception("feedback ingest failed")
                answer = Unavailable(f"feedback ingest failed, batch not stored: {e!r}")
            pipe.send(answer)
    except (EOFError, KeyboardInterrupt):
        pass  # the gateway went away
    finally:
        store.close()
        reader.close()
