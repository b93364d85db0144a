"""Reading the log while the gateway writes it: get by id, query by fields and time, tail.

Readers open segments read-only in their own read transactions, so they never block the writer
and can run from another process. A damaged segment is reported with its path and skipped; a
record that fails to decode is reported with its segment and key, never dropped silently.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from gateway.mapguard import EnvironmentClosed
from gateway.requestlog.record import KEY, Record, RecordFormatError, decode, id_key, key_time_ns
from gateway.requestlog.segments import Segment, list_segments, segment_start_ns

DAMAGE = (
    lmdb.CorruptedError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PageNotFoundError,
    lmdb.IncompatibleError,
    lmdb.BadChecksumError,
)
"""What LMDB says of a file that is no sound segment: it will not get better, so it is reported once and
skipped for good."""
READ_CHUNK = 1024
"""Records a scan reads per transaction."""
REOPEN_WAIT_S = 1.0

log = logging.getLogger(__name__)

_Result = TypeVar("_Result")


def _again_after_rotation(method: Callable[..., _Result]) -> Callable[..., _Result]:
    """Run a one-shot read again if the writer rotated and closed the live segment it was reading:
    the second run finds that segment reopened read-only, as a finished one."""

    @functools.wraps(method)
    def run(self: LogReader, *args: Any) -> _Result:
        try:
            return method(self, *args)
        except EnvironmentClosed:
            return method(self, *args)

    return run


@dataclass
class Problem:
    """Something a reader could not read: a whole segment (key None) or one record."""

    path: Path
    key: bytes | None
    error: str

    def __str__(self) -> str:
        where = f"{self.path} record {self.key.hex()}" if self.key is not None else str(self.path)
        return f"{where}: {self.error}"


@dataclass(frozen=True)
class Query:
    model: str | None = None
    version: str | None = None
    role: str | None = None
    status: int | None = None
    ood: bool | None = None
    since_ns: int | None = None
    until_ns: int | None = None

    def matches(self, r: Record) -> bool:
        return (
            (self.model is None or r.model == self.model)
            and (self.version is None or r.version == self.version)
            and (self.role is None or r.role == self.role)
            and (self.status is None or r.status == self.status)
            and (self.ood is None or bool(r.ood) == self.ood)
            and (self.since_ns is None or r.ts_ns >= self.since_ns)
            and (self.until_ns is None or r.ts_ns <= self.until_ns)
        )


@dataclass
class LogReader:
    """Keeps segments open between calls (opening an LMDB environment costs far more than a
    lookup) and notices segments added by rotation or removed by retention."""

    log_dir: Path
    live: Callable[[], Segment] | None = None  # the in-process writer's open segment, if any
    problems: list[Problem] = field(default_factory=list)
    _open: dict[Path, Segment] = field(default_factory=dict)
    _damaged: set[Path] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _segments(self, newest_first: bool = False) -> list[Segment]:
        with self._lock:  # feedback ingest and quality reports read from worker threads
            return self._segments_locked(newest_first)

    def _segments_locked(self, newest_first: bool) -> list[Segment]:
        live = self.live() if self.live is not None else None
        # A segment newer than the live one was started by another worker: this process's writer will
        # adopt it, and LMDB allows one open per process, so it is read once that has happened.
        paths = [p for p in list_segments(self.log_dir) if live is None or p <= live.path]
        for gone in set(self._open) - set(paths):
            self._open.pop(gone).close()
        for path in paths:
            if live is not None and path == live.path:
                continue  # shared, never opened or closed here
            if path in self._open or path in self._damaged:
                continue
            try:
                self._open[path] = Segment.open(path, 0, readonly=True)
            except DAMAGE as e:
                self._damaged.add(path)
                self._report(Problem(path, None, f"damaged segment skipped: {e}"))
            except lmdb.Error as e:
                # Not damaged, not readable now: the newest segment may still be in creation (no file or no
                # databases yet), or no file descriptor is spare. Tried again on the next read: skipped for
                # good, its records would be missing for the rest of a long-lived reader's life.
                creating = path == paths[-1]
                log.log(
                    logging.DEBUG if creating else logging.WARNING, "request log: %s skipped this time: %s", path, e
                )
        ordered = [
            live if live is not None and p == live.path else self._open[p]
            for p in paths
            if p in self._open or (live is not None and p == live.path)
        ]
        return ordered[::-1] if newest_first else ordered

    def close(self) -> None:
        for segment in self._open.values():
            segment.close()
        self._open.clear()

    def _report(self, problem: Problem) -> None:
        log.warning("request log: %s", problem)
        self.problems.append(problem)

    def _decode(self, segment: Segment, key: bytes, value: bytes) -> Record | None:
        try:
            return decode(value)
        except RecordFormatError as e:
            self._report(Problem(segment.path, key, str(e)))
            return None

    @_again_after_rotation
    def get(self, request_id: str) -> list[Record]:
        """The request's record and its shadows' records, oldest first."""
        if not request_id:  # no record has one (the gateway generates ids), and LMDB refuses empty keys
            return []
        found: list[Record] = []
        wanted = id_key(request_id)
        for segment in self._segments(newest_first=True):
            with segment.read(segment.ids) as txn:
                cursor = txn.cursor()
                if not cursor.set_key(wanted):
                    continue
                for key in cursor.iternext_dup():
                    value = txn.get(key, db=segment.records)
                    record = self._decode(segment, key, value) if value is not None else None
                    if record is not None:
                        found.append(record)
        return sorted(found, key=lambda r: (r.ts_ns, r.role != "primary"))

    @_again_after_rotation
    def known_keys(self, keys: list[bytes]) -> set[bytes]:
        """Those id keys (`id_key(request_id)`) that have a record: looked up in each segment's id index,
        newest first, nothing decoded."""
        found: set[bytes] = set()
        wanted = sorted(keys)  # B-tree pages in order: a third cheaper than random lookups
        distinct = len(set(keys))
        for segment in self._segments(newest_first=True):
            with segment.read(segment.ids) as txn:
                found.update(txn.cursor().getmulti(wanted, values=False))  # half the cost of fetching values
            if len(found) == distinct:
                break
            wanted = [key for key in wanted if key not in found]
        return found

    def query(self, query: Query = Query()) -> Iterator[Record]:
        """Matching records in time order; whole segments outside the time range are skipped."""
        for segment in self._segments():
            if query.since_ns is not None and self._newest_ns(segment) < query.since_ns:
                continue  # every record here is older than `since`
            if query.until_ns is not None and segment_start_ns(segment.path) > query.until_ns:
                break
            # Keys hold unsigned times: a `since` before 1970 starts at the first record.
            for key, value in self._scan(segment, max(query.since_ns or 0, 0)):
                if query.until_ns is not None and key_time_ns(key) > query.until_ns:
                    break
                record = self._decode(segment, key, value)
                if record is not None and query.matches(record):
                    yield record

    @staticmethod
    def _newest_ns(segment: Segment) -> int:
        """Its newest record's arrival time (-1 when empty). Looked up, not inferred from the next segment's
        name: a worker writes on for a moment after another started the next, and a clock stepped back
        names a new segment before the newest records of the one it follows."""
        try:
            with segment.read(segment.records) as txn:
                cursor = txn.cursor()
                return key_time_ns(cursor.key()) if cursor.last() else -1
        except EnvironmentClosed:  # rotated away just now: not skipped, the scan reads it reopened
            return 1 << 63

    def _scan(self, segment: Segment, since_ns: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) in key order from `since_ns`, READ_CHUNK per transaction: one held while the
        caller pauses (an export, a slow client) would stop the writer reusing pages, so the live
        segment would grow, and would hold up a resize of its map."""
        start = KEY.pack(since_ns, 0, 0)
        while True:
            try:
                with segment.read(segment.records) as txn:
                    cursor = txn.cursor()
                    chunk = list(itertools.islice(cursor.iternext(), READ_CHUNK)) if cursor.set_range(start) else []
            except EnvironmentClosed:  # the writer rotated past it meanwhile: read on in it as a finished one
                reopened = self._reopened(segment)
                if reopened is None:
                    return  # retention deleted it
                segment = reopened
                continue
            yield from chunk
            if len(chunk) < READ_CHUNK:
                return
            start = chunk[-1][0] + b"\x00"  # the smallest key after the last one read

    def _reopened(self, closed: Segment) -> Segment | None:
        """The segment at `closed`'s path, open again (None once retention deleted it). The writer closes
        its live segment before it publishes the next one, so for a moment the closed one is still live."""
        deadline = time.monotonic() + REOPEN_WAIT_S
        while True:
            segment = next((s for s in self._segments() if s.path == closed.path), None)
            if segment is None or not segment.guard.closed:
                return segment
            if time.monotonic() > deadline:
                raise EnvironmentClosed(str(closed.path))  # the writer stopped: nothing reopens it in this process
            time.sleep(0.001)

    @_again_after_rotation
    def tail(self, count: int) -> list[Record]:
        """The newest `count` records, oldest first."""
        newest: list[Record] = []
        for segment in self._segments(newest_first=True):
            with segment.read(segment.records) as txn:
                cursor = txn.cursor()
                if not cursor.last():
                    continue
                for key, value in cursor.iterprev():
                    record = self._decode(segment, key, value)
                    if record is not None:
                        newest.append(record)
                    if len(newest) >= count:
                        return newest[::-1]
        return newest[::-1]

    @_again_after_rotation
    def count(self) -> int:
        """Records in all readable segments (for progress reports)."""
        total = 0
        for segment in self._segments():
            with segment.read() as txn:
                total += int(txn.stat(segment.records)["entries"])
        return total
