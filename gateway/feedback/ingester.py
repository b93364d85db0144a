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
By default it moves off a pinned gateway's CPUs (`feedback.ingest_cpus = "spare"`): confined to a fully
loaded serving CPU it got ~25,000 records/s while the other CPU sat ~40% idle, and allowed on both it
still cost inference the serving CPU's idle moments (0.93× against 1.01× off it, in one run).

The child opens the request log read-only and the feedback store for writing (LMDB serialises writers
across processes; the gateway's own handle on the store reads what the child commits). It is started on
the first batch, so a gateway that never receives feedback pays nothing, and restarted if it dies.
The child's side is `ingest_child`, started as `python -m gateway.feedback.ingest_child`, not by
multiprocessing: spawn would first re-run the gateway's main module (the `canary-gateway` script imports
the whole CLI, ~0.5 s of CPU) at the gateway's own priority, on its CPU."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError, Unavailable
from gateway.feedback import ingest_child
from gateway.feedback.ingest import Outcome

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
STOPPING = "feedback: the gateway is stopping; resend the batch to a running one"
ANSWER_TIMEOUT_S = 120.0  # a batch of thousands takes milliseconds; SCHED_IDLE under full load, seconds


class IngestProcess:
    """One batch at a time through a pipe to the child (it is serial anyway). `submit_async` queues
    batches for one thread of its own, so waiting batches never occupy asyncio's shared thread pool,
    even once their callers have gone (a cancelled call's batch still runs if it had started)."""

    def __init__(
        self,
        log_dir: Path,
        feedback_dir: Path,
        priority: str | int = "idle",
        cpus: str | tuple[int, ...] = "spare",
        log_level: str = "info",
        worker: int | None = None,
    ) -> None:
        self._dirs = (log_dir, feedback_dir)
        self._priority = priority
        self._cpus = cpus
        self._logging = (log_level, "" if worker is None else str(worker))  # the gateway's level; its worker slot
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._pipe: Connection | None = None
        self._turns = ThreadPoolExecutor(1, thread_name_prefix="feedback-ingest")
        self._closed = False

    async def submit_async(self, model: str, task: str, request: Any) -> Outcome:
        """`submit` for a SubmitFeedbackRequest message, serialized on the ingest thread, not the loop."""
        if self._closed:
            raise Unavailable(STOPPING)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._turns, lambda: self.submit(model, task, request.SerializeToString()))

    def submit(self, model: str, task: str, request: bytes) -> Outcome:
        """Check and store one serialized SubmitFeedbackRequest; blocks until the child answers."""
        with self._lock:
            if self._closed:
                raise Unavailable(STOPPING)
            try:
                pipe = self._pipe if self.alive else None
                if pipe is None:
                    pipe = self._start()
                pipe.send((model, task, request))  # times out too (SO_SNDTIMEO): a batch outgrows the buffer
                if not pipe.poll(ANSWER_TIMEOUT_S):
                    raise TimeoutError(f"no answer in {ANSWER_TIMEOUT_S:.0f} s")
                answer = pipe.recv()
            except (EOFError, OSError) as e:  # TimeoutError is an OSError
                exit_status = self._kill()
                raise Unavailable(
                    f"feedback ingest process failed ({e!r}{exit_status}; its error, if any, is in the gateway's "
                    "log): this batch may not be stored; truth is idempotent, so resend it"
                ) from e
        if isinstance(answer, GatewayError):
            raise answer
        assert isinstance(answer, Outcome)
        return answer

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    @property
    def alive(self) -> bool:
        child = self._child
        return child is not None and child.poll() is None

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
        # A fresh interpreter, not fork: the gateway runs gRPC's threads, which a forked child would inherit broken.
        parent, child = socket.socketpair()
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(ANSWER_TIMEOUT_S), 0))
        cpus = self._cpus if isinstance(self._cpus, str) else ",".join(map(str, self._cpus))
        argv = [str(child.fileno()), *map(str, self._dirs), str(self._priority), cpus, *self._logging]
        # The child runs this very code: the directory this `gateway` came from first, then the gateway's own
        # import path; not the working directory (-P), which may hold another checkout.
        package_root = str(Path(ingest_child.__file__).resolve().parents[2])
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *sys.path])}
        try:
            with child:
                # Its own session: a Ctrl-C meant for the gateway does not cut a batch short; the gateway's
                # close() (or, if it dies, the end of the socket) stops the child.
                self._child = subprocess.Popen(
                    [sys.executable, "-P", "-m", ingest_child.__name__, *argv],
                    pass_fds=(child.fileno(),),
                    env=environment,
                    start_new_session=True,
                )
        except BaseException:
            parent.close()
            raise
        pipe = self._pipe = Connection(parent.detach())
        log.info(
            "feedback ingest process %d started (CPU priority %s, CPUs %s)", self._child.pid, self._priority, self._cpus
        )
        return pipe

    def _kill(self) -> str:
        """After a failure the child is killed, not asked to stop (its socket may hold half a message);
        returns its exit status for the caller's message."""
        child, self._child = self._child, None
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if child is None:
            return ""
        if child.poll() is None:
            child.kill()
        return f"; exit status {child.wait()}"

    def _stop(self) -> None:
        """Ask the child to finish (no batch is in flight: the caller holds the lock)."""
        if self._pipe is not None:
            try:
                self._pipe.send(None)
            except OSError:
                pass  # already gone
            self._pipe.close()
            self._pipe = None
        if self._child is not None:
            try:
                self._child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            self._child = None
