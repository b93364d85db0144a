"""The feedback ingest process's side (see `ingester`): `python -m gateway.feedback.ingest_child FD LOG_DIR
FEEDBACK_DIR PRIORITY CPUS LOG_LEVEL WORKER`. It lowers its CPU priority and moves to its CPUs first, and only then
imports what checking and storing need (numpy, lmdb, gRPC's errors, the messages: ~0.3 s of CPU), so
starting it takes next to nothing from serving."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

log = logging.getLogger("gateway.feedback.ingest_child")


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
    gateway = os.sched_getaffinity(0)
    try:
        if isinstance(cpus, str):  # "spare": off the serving CPUs, where it would still take their idle moments
            os.sched_setaffinity(0, range(os.sysconf("SC_NPROCESSORS_CONF")))  # the kernel clips it to a cpuset
            os.sched_setaffinity(0, (os.sched_getaffinity(0) - gateway) or gateway)
        else:
            os.sched_setaffinity(0, cpus)
    except OSError as e:
        log.warning("cannot run on CPUs %s (%s); staying on %s", cpus, e, os.sched_getaffinity(0))


def _serve(pipe: Connection, log_dir: Path, feedback_dir: Path) -> None:
    """Batches in, outcomes (or the GatewayError that refused the batch) out, until None."""
    from gateway.errors import GatewayError, Unavailable
    from gateway.feedback import ingest
    from gateway.feedback.store import FeedbackStore
    from gateway.protocol import admin as pb
    from gateway.requestlog.reader import LogReader

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
                log.exception("a batch failed")
                answer = Unavailable(f"feedback ingest failed, batch not stored: {e!r}")
            pipe.send(answer)
    except (EOFError, OSError):
        pass  # the gateway went away (mid-batch: the answer finds the socket closed)
    finally:
        store.close()
        reader.close()


def main(argv: list[str]) -> None:
    """The arguments IngestProcess starts it with: the socket's fd, the directories, priority, CPUs, and the
    gateway's log level and worker slot ("" for a lone gateway), so its lines read like the gateway's own."""
    fd, log_dir, feedback_dir, priority, cpus, log_level, worker = argv
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s {f'worker {worker} ' if worker else ''}%(name)s "
        "(feedback ingest process %(process)d): %(message)s",
    )
    _lower_priority(int(priority) if priority.isdigit() else priority)
    _place(cpus if cpus in ("spare", "gateway") else tuple(int(cpu) for cpu in cpus.split(",")))
    from multiprocessing.connection import Connection  # ~20 ms of imports: after the priority is lowered

    _serve(Connection(int(fd)), Path(log_dir), Path(feedback_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
