"""The log writer: an answer waits for its record's commit (and, with fsync, for its fsync).

Every record is committed inline by the handler that owns it, in its own LMDB transaction, just
before it answers: without fsync a commit costs a few microseconds. Deferring commits to share
transactions measured worse inside the server (~100 us more per request): suspending and
resuming every grpc.aio handler costs far more than the transaction it saves.

With several workers (`serve --workers N`) every process writes the same live segment: LMDB
serialises their write transactions, and one fsync covers every process's commits to the file. A
rotation takes `rotation.lock` in the log directory, so two workers never start two segments; the
others adopt the new segment at their next rotation check (within `ROTATION_CHECK_INTERVAL_S`).

`sync = "fsync"` adds group fsync: a syncer thread fsyncs the segment (`mdb_env_sync`) when
handlers are waiting (after gathering for `fsync_gather_us` when the last fsync covered more than
one answer) and answers all of them with one fsync, since it covers every commit made before it
started. The event loop never waits on the disk. When more than `max_pending` handlers wait for
an fsync, new requests are refused with RESOURCE_EXHAUSTED: the gateway pushes back rather than
answer without a durable record.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb

from gateway.config import LogConfig
from gateway.errors import ResourceExhausted, Unavailable
from gateway.requestlog.record import KeyMaker, Record, encode, id_key
from gateway.requestlog.segments import Segment, apply_retention, list_segments, segment_name, segment_start_ns

log = logging.getLogger(__name__)

ROTATION_CHECK_INTERVAL_S = 0.05


class LogWriter:
    """Owns the live segment; one per process (LMDB serialises writers across processes)."""

    def __init__(self, log_dir: Path, config: LogConfig, worker: int | None = None) -> None:
        self._dir = log_dir
        self._worker = worker  # stamped on every record: which worker process answered
        self._config = config
        self._map_size = max(config.segment_max_bytes * 2, 1 << 20)
        self._keys = KeyMaker()
        self._next_rotation_check = 0.0
        self._bytes_since_check = 0
        self._segment_lock = threading.Lock()  # the syncer must not fsync a segment being closed
        self._segment = self._open_latest_or_new()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[asyncio.Future[None]] = []  # committed, waiting for their fsync to start
        self._syncing = 0  # answers whose fsync is running (taken from _waiting, not yet resolved)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        durable = config.sync == "fsync"
        self._syncer = threading.Thread(target=self._run_syncer, name="log-fsync", daemon=True) if durable else None
        if self._syncer is not None:
            self._syncer.start()
        self.fsyncs = 0
        self.records_written = 0

    def live_segment(self) -> Segment:
        """The segment being written (an in-process reader must share it: LMDB allows one open per process)."""
        return self._segment

    @property
    def max_pending(self) -> int:
        return self._config.max_pending

    @property
    def queue_depth(self) -> int:
        """Handlers waiting for an fsync, the running one included (always 0 without fsync: commits are
        inline): counting only those not yet taken let up to twice `max_pending` wait."""
        return len(self._waiting) + self._syncing

    # --- segments -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _rotation_lock(self) -> Iterator[None]:
        """Held while choosing or starting the live segment: workers never start two at once."""
        self._dir.mkdir(parents=True, exist_ok=True)
        with open(self._dir / "rotation.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _open_latest_or_new(self) -> Segment:
        with self._rotation_lock():
            segments = list_segments(self._dir)
            if segments:
                latest = segments[-1]
                try:
                    segment = Segment.open(latest, self._map_size)
                    if not self._should_rotate(segment):
                        return segment
                    segment.close()
                except lmdb.Error as e:
                    log.error("request log segment %s is damaged (%s); starting a new segment", latest, e)
            return self._open_new()

    def _open_new(self) -> Segment:
        start = time.time_ns()
        for existing in list_segments(self._dir):
            start = max(start, segment_start_ns(existing) + 1)  # names stay unique and ordered
        return Segment.open(self._dir / segment_name(start), self._map_size)

    def _should_rotate(self, segment: Segment) -> bool:
        age_s = (time.time_ns() - segment_start_ns(segment.path)) / 1e9
        too_old = self._config.segment_max_age_s > 0 and age_s >= self._config.segment_max_age_s
        return too_old or segment.used_bytes() >= self._config.segment_max_bytes

    def _rotate(self, *, due: bool = True) -> None:
        """Move to the newest segment, starting one if it is `due` for rotation (or there is no newer one).

        Under the log directory's rotation lock: another worker may have rotated already, and then
        its segment is the one to adopt."""
        if not due and (self._worker is None or list_segments(self._dir)[-1:] == [self._segment.path]):
            return  # the usual case, decided without the lock
        with self._rotation_lock(), self._segment_lock:
            latest = list_segments(self._dir)[-1:]
            newer = latest and latest[0] > self._segment.path
            if not due and not newer:
                return
            if self._syncer is not None:
                with self._segment.guard.shared() as env:  # a reader thread may be adopting a grown map
                    env.sync(True)  # what the syncer has not covered yet stays durable
            self._segment.close()
            adopted = Segment.open(latest[0], self._map_size) if newer else None
            if adopted is not None and self._should_rotate(adopted):
                adopted.close()
                adopted = None
            self._segment = adopted or self._open_new()
            log.info("request log %s %s", "moved to" if adopted else "rotated to", self._segment.path)
            apply_retention(
                self._dir,
                self._segment.path,
                self._config.retention_max_bytes,
                self._config.retention_max_age_s,
                in_use_s=ROTATION_CHECK_INTERVAL_S * 20 if self._worker is not None else 0.0,
            )

    # --- writing ------------------------------------------------------------------------------

    def _put(self, record: Record) -> None:
        """One record in its own transaction (under its key, its id and its primary's id)."""
        record.worker = self._worker
        key = self._keys.make(record.ts_ns)
        value = encode(record)
        self._bytes_since_check += len(value)
        segment = self._segment
        records, ids = segment.records, segment.ids
        puts: tuple[tuple[lmdb._Database, bytes, bytes], ...]
        if record.primary_id:  # `log get PRIMARY` finds its shadows too
            puts = ((records, key, value), (ids, id_key(record.id), key), (ids, id_key(record.primary_id), key))
        else:
            puts = ((records, key, value), (ids, id_key(record.id), key))
        segment.guard.put(puts)  # adopts the map size another worker grew it to

    def _put_growing(self, record: Record) -> None:
        """The record did not fit: put it in a fresh segment, growing the map for a record larger than
        an empty segment, so a full map never fails a request."""
        self._rotate()
        while True:
            try:
                self._put(record)
                return
            except lmdb.MapFullError:
                if self._segment.used_bytes() > self._config.segment_max_bytes // 8:
                    self._rotate()
                else:
                    with self._segment.guard.shared() as env:
                        size = env.info()["map_size"]
                    self._segment.guard.grow(size + 4 * len(encode(record)))

    def _write(self, record: Record) -> None:
        """Commit `record`; a full map rotates and retries, never fails it."""
        # env.info() per commit would cost more than the commit: look every 1/32 of a segment or 50 ms,
        # before writing, so a worker idle for a while moves to the segment others started first.
        now = time.monotonic()
        if now >= self._next_rotation_check or self._bytes_since_check * 32 >= self._config.segment_max_bytes:
            self._next_rotation_check = now + ROTATION_CHECK_INTERVAL_S
            self._bytes_since_check = 0
            self._rotate(due=self._should_rotate(self._segment))
        try:
            self._put(record)
        except lmdb.MapFullError:
            self._put_growing(record)
        self.records_written += 1

    def follow_rotation(self) -> None:
        """Move to a segment another worker started (called on the event loop, also when idle): what
        this worker's readers see stops at its live segment."""
        if self._worker is not None:
            self._rotate(due=False)

    def admit(self) -> None:
        """Refuse new work while too many records wait for their commit (checked before any work)."""
        if self.queue_depth >= self._config.max_pending:
            raise ResourceExhausted(
                f"request log: {self.queue_depth} answers are waiting for their fsync (log.max_pending "
                f"{self._config.max_pending}); retry later"
            )

    async def commit(self, record: Record) -> None:
        """Return once `record` is committed (and fsynced, with `sync = "fsync"`)."""
        fsynced = self.write(record)
        if fsynced is not None:
            await fsynced

    def write(self, record: Record) -> asyncio.Future[None] | None:
        """`commit` for the request path: commit `record` now; with `sync = "fsync"`, return the future
        of its fsync (without fsync, None: no coroutine to create and resume per request)."""
        self.write_now(record)
        return self._durable() if self._syncer is not None else None

    def write_now(self, record: Record) -> None:
        """Commit one record right here, on the event loop, without suspending the caller."""
        try:
            self._write(record)
        except Exception as e:  # disk full, permissions, ...: the request learns it, unanswered
            log.exception("request log write failed")
            raise Unavailable(f"request log write failed, request not answered: {e}") from e

    def _durable(self) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiting.append(future)
        self._wake.set()
        return future

    def _run_syncer(self) -> None:
        covered = 0  # answers the previous fsync covered
        while True:
            self._wake.wait()
            if self._config.fsync_gather_us and covered > 1 and not self._closing:
                # An fsync costs ~0.2 ms of kernel CPU on the serving core whatever it covers: when
                # answers come in groups, let more join this one (a lone caller is never delayed).
                time.sleep(self._config.fsync_gather_us / 1e6)
            with self._lock:
                self._wake.clear()
                waiting, self._waiting = self._waiting, []
                self._syncing += len(waiting)
                if self._closing and not waiting:
                    return
            if not waiting:
                continue
            covered = len(waiting)
            error: BaseException | None = None
            if self._config.fault_fsync_delay_ms:
                time.sleep(self._config.fault_fsync_delay_ms / 1000)
            try:
                with self._segment_lock, self._segment.guard.shared() as env:  # the loop thread may grow the map
                    env.sync(True)  # covers every commit made before it started
                self.fsyncs += 1
            except Exception as e:  # any failure answers its batch: a dead syncer would leave every waiter hanging
                log.exception("request log fsync failed")
                error = Unavailable(f"request log fsync failed, request not answered: {e}")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._synced, waiting, error)

    def _synced(self, waiting: list[asyncio.Future[None]], error: BaseException | None) -> None:
        with self._lock:
            self._syncing -= len(waiting)
        _resolve(waiting, error)

    async def close(self) -> None:
        """Let waiting handlers get their fsync, stop the syncer, close the segment."""
        if self._syncer is not None:
            with self._lock:
                self._closing = True
            self._wake.set()
            await asyncio.to_thread(self._syncer.join)
            with self._segment.guard.shared() as env:
                env.sync(True)
        self._segment.close()


def _resolve(waiting: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in waiting:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
