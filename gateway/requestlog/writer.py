"""The log writer: group commit into the current segment; an answer waits for its record's commit.

Two ways to commit, chosen by `log.writer` (default: by `log.sync`):

* inline (default for `sync = "process"`): the handler commits its record itself, in its own
  LMDB transaction, before it answers. Without fsync a commit costs a few microseconds; the
  alternatives measured worse inside the server: deferring commits to the end of the loop turn
  (to share transactions) cost ~100 us per request more, because the extra suspend and resume
  of every handler costs grpc.aio far more than the transaction it saves.
* thread (default for `sync = "fsync"`): a writer thread commits whatever accumulated while the
  previous commit was fsyncing, so one fsync (~0.3 ms) is shared by every request of that window
  and the event loop never waits on the disk.

When more than `max_pending` records wait for a commit, `append` refuses with RESOURCE_EXHAUSTED:
the gateway pushes back rather than answer without a record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import lmdb

from gateway.config import LogConfig
from gateway.errors import GatewayError, ResourceExhausted, Unavailable
from gateway.requestlog.record import KeyMaker, Record, encode, id_key
from gateway.requestlog.segments import Segment, apply_retention, list_segments, segment_name, segment_start_ns

log = logging.getLogger(__name__)

_Batch = list[tuple[Record, "asyncio.Future[None]"]]
ROTATION_CHECK_INTERVAL_S = 0.05


class LogWriter:
    """Owns the live segment; one per process (LMDB serialises writers across processes)."""

    def __init__(self, log_dir: Path, config: LogConfig) -> None:
        self._dir = log_dir
        self._config = config
        self._map_size = max(config.segment_max_bytes * 2, 1 << 20)
        self._keys = KeyMaker()
        self._next_rotation_check = 0.0
        self._bytes_since_check = 0
        self._segment = self._open_latest_or_new()
        self._pending: _Batch = []
        self._committing = 0  # records handed to the writer thread, not yet committed
        self._loop: asyncio.AbstractEventLoop | None = None
        threaded = config.writer == "thread" or (config.writer == "auto" and config.sync == "fsync")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run_thread, name="log-writer", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()
        self.commits = 0
        self.records_written = 0
        self.refused = 0

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def live_segment(self) -> Segment:
        """The segment being written (an in-process reader must share it: LMDB allows one open per process)."""
        return self._segment

    @property
    def max_pending(self) -> int:
        return self._config.max_pending

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + self._committing

    # --- segments -------------------------------------------------------------------------

    def _open_latest_or_new(self) -> Segment:
        segments = list_segments(self._dir)
        if segments:
            latest = segments[-1]
            try:
                segment = Segment.open(latest, self._map_size, durable=self._config.sync == "fsync")
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
        return Segment.open(self._dir / segment_name(start), self._map_size, durable=self._config.sync == "fsync")

    def _should_rotate(self, segment: Segment) -> bool:
        age_s = (time.time_ns() - segment_start_ns(segment.path)) / 1e9
        too_old = self._config.segment_max_age_s > 0 and age_s >= self._config.segment_max_age_s
        return too_old or segment.used_bytes() >= self._config.segment_max_bytes

    def _rotate(self) -> None:
        self._segment.close()
        self._segment = self._open_new()
        log.info("request log rotated to %s", self._segment.path)
        apply_retention(
            self._dir, self._segment.path, self._config.retention_max_bytes, self._config.retention_max_age_s
        )

    # --- writing ------------------------------------------------------------------------------

    def _put_all(self, records: list[Record]) -> None:
        segment = self._segment
        with segment.env.begin(write=True) as txn:
            for record in records:
                key = self._keys.make(record.ts_ns)
                value = encode(record)
                self._bytes_since_check += len(value)
                txn.put(key, value, db=segment.records)
                txn.put(id_key(record.id), key, db=segment.ids)
                if record.primary_id:  # `log get PRIMARY` finds its shadows too
                    txn.put(id_key(record.primary_id), key, db=segment.ids)

    def _put_one_by_one(self, records: list[Record]) -> None:
        """The group did not fit: continue in fresh segments, growing the map for a record larger
        than an empty segment, so a full map never fails a request."""
        self._rotate()
        for record in records:
            while True:
                try:
                    self._put_all([record])
                    break
                except lmdb.MapFullError:
                    if self._segment.used_bytes() > self._config.segment_max_bytes // 8:
                        self._rotate()
                    else:
                        size = self._segment.env.info()["map_size"]
                        self._segment.env.set_mapsize(size + 4 * len(encode(record)))

    def _write(self, records: list[Record]) -> None:
        """One transaction for all records; a full map rotates and retries, never fails them."""
        if self._config.fault_commit_delay_ms:
            time.sleep(self._config.fault_commit_delay_ms / 1000)
        try:
            self._put_all(records)
        except lmdb.MapFullError:
            self._put_one_by_one(records)
        self.commits += 1
        self.records_written += len(records)
        # env.info() per commit would cost more than the commit: look every 1/32 of a segment or 50 ms.
        now = time.monotonic()
        if now >= self._next_rotation_check or self._bytes_since_check * 32 >= self._config.segment_max_bytes:
            self._next_rotation_check = now + ROTATION_CHECK_INTERVAL_S
            self._bytes_since_check = 0
            if self._should_rotate(self._segment):
                self._rotate()

    def admit(self) -> None:
        """Refuse new work while too many records wait for their commit (checked before any work)."""
        if self.queue_depth >= self._config.max_pending:
            self.refused += 1
            raise ResourceExhausted(
                f"request log: {self.queue_depth} records are waiting for commit (log.max_pending "
                f"{self._config.max_pending}); retry later"
            )

    async def commit(self, record: Record) -> None:
        """Return once `record` is committed (inline: written now, without suspending the caller)."""
        if self._thread is None:
            self.write_now(record)
        else:
            await self.append(record)

    def write_now(self, record: Record) -> None:
        """Inline mode: commit one record right here, on the event loop, before the caller answers."""
        error = self._try_write_records([record])
        if error is not None:
            raise error

    def append(self, record: Record) -> asyncio.Future[None]:
        """Thread mode: queue a record of admitted work; the future resolves once it is committed."""
        assert self._thread is not None, "inline mode commits with write_now"
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending.append((record, future))
        self._wake.set()
        return future

    def _try_write(self, batch: _Batch) -> BaseException | None:
        return self._try_write_records([record for record, _ in batch])

    def _try_write_records(self, records: list[Record]) -> GatewayError | None:
        try:
            self._write(records)
            return None
        except Exception as e:  # disk full, permissions, ...: every waiting request learns it
            log.exception("request log write failed")
            return Unavailable(f"request log write failed, request not answered: {e}")

    def _run_thread(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                batch, self._pending = self._pending, []
                self._committing = len(batch)
            if batch:
                error = self._try_write(batch)
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_resolve, batch, error)
            with self._lock:
                self._committing = 0
                if self._closing and not self._pending:
                    return

    async def close(self) -> None:
        """Commit what is pending, stop the thread, close the segment."""
        if self._thread is not None:
            with self._lock:
                self._closing = True
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
        self._segment.close()


def _resolve(batch: _Batch, error: BaseException | None) -> None:
    for _, future in batch:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
