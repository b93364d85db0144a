"""gRPC's transport threads wait their turn instead of preempting the event loop.

grpc.aio hands every completion (a message read, a write done, a call ended) from its poller thread
and its `event_engine` threads to the event loop's thread. On a core the loop keeps busy, each wake-up
of those threads preempts the loop at once (the kernel favours a thread that slept), so a unary call
costs some 16 context switches, and a sixth of the server's CPU went to switching (perf: the kernel's
`finish_task_switch`). Under SCHED_BATCH a waking thread does not preempt a running one: it runs when
the loop blocks or its time slice ends, and then hands over every completion that came in meanwhile.
When the loop is idle (one request in flight) the thread runs at once, as before, unless another
process keeps the CPU busy: a waking SCHED_BATCH thread preempts nothing, so it then waits out that
process's time slice (milliseconds; README, Performance). Only SCHED_IDLE processes are preempted.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

EVENT_ENGINE_THREAD = "event_engine"  # the name gRPC's C++ threads carry (/proc/.../comm)
POLLER_TARGET = "(_poll_wrapper)"  # grpc.aio's poller: a Python thread, named after its target


def _transport_threads() -> list[int]:
    """Native ids of gRPC's poller thread and event-engine threads in this process, as of now."""
    pollers = {t.native_id for t in threading.enumerate() if t.name.endswith(POLLER_TARGET)}
    found = []
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        try:
            with open(f"/proc/self/task/{entry}/comm") as comm:
                name = comm.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if tid in pollers or name == EVENT_ENGINE_THREAD:
            found.append(tid)
    return found


def defer_transport_threads() -> int:
    """Put gRPC's transport threads under SCHED_BATCH (threads they start later inherit it); return
    how many. Where the platform has no SCHED_BATCH (not Linux) nothing changes."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not os.path.isdir("/proc/self/task"):
        return 0
    changed = 0
    for tid in _transport_threads():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            changed += 1
        except OSError as e:  # the thread ended meanwhile, or a sandbox forbids it: keep serving
            log.debug("SCHED_BATCH for thread %d: %s", tid, e)
    return changed
