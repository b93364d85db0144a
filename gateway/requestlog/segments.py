"""Log segments: a directory of LMDB environments, one per time slice, oldest first.

Each segment holds two databases: `records` (time-ordered key → msgpack record) and `by_id`
(request id → record keys, duplicates sorted). Rotation starts a new segment when the current one
reaches its size or age limit, or when its map is full; retention deletes only whole segments.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from gateway.mapguard import MapGuard, opening

log = logging.getLogger(__name__)

PREFIX = "seg-"
RECORDS_DB = b"records"
IDS_DB = b"by_id"


def segment_name(start_ns: int) -> str:
    return f"{PREFIX}{start_ns:020d}"


def segment_start_ns(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def _is_segment_name(name: str) -> bool:
    start = name[len(PREFIX) :]
    return name.startswith(PREFIX) and start.isascii() and start.isdigit()  # int() refuses "²"


def list_segments(log_dir: Path) -> list[Path]:
    """Segment directories, oldest first."""
    if not log_dir.is_dir():
        return []
    return sorted(p for p in log_dir.iterdir() if p.is_dir() and _is_segment_name(p.name))


def segment_bytes(path: Path) -> int:
    """Disk space a segment uses: allocated blocks, since LMDB's map file is sparse."""
    return sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())


@dataclass
class Segment:
    path: Path
    env: lmdb.Environment
    records: lmdb._Database
    ids: lmdb._Database
    # The writer grows the live segment's map (a record larger than an empty segment), or adopts the size
    # another worker grew it to, while this process's readers may be in transactions on it.
    guard: MapGuard = field(init=False)

    def __post_init__(self) -> None:
        self.guard = MapGuard(self.env)

    @classmethod
    def open(cls, path: Path, map_size: int, readonly: bool = False) -> Segment:
        """Open (or create, for the writer) one segment; commits never fsync (the writer's syncer does)."""
        if readonly:
            # map_size 0: the map the writer's header records. An unsized reader would map only the pages in
            # use as it opens, and the writer's next page would fail the very next transaction, open_db's.
            env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=2, create=False, map_size=0)
        else:
            path.mkdir(parents=True, exist_ok=True)
            # With writemap, LMDB truncates the file to the map it opens with: a segment another worker grew
            # (a record larger than an empty segment) is opened at its header's size, never cut back under
            # that worker's map, whose next new page would then lie past the end of the file (SIGBUS).
            existing = (path / "data.mdb").exists()
            env = lmdb.open(
                str(path),
                map_size=0 if existing else map_size,
                max_dbs=2,
                sync=False,
                metasync=False,
                writemap=True,
                max_readers=256,
            )
            if existing and env.info()["map_size"] < map_size:
                env.set_mapsize(map_size)
        try:
            records, ids = opening(
                env,
                lambda: (
                    env.open_db(RECORDS_DB, create=not readonly),
                    env.open_db(IDS_DB, dupsort=True, create=not readonly),
                ),
            )
        except lmdb.Error:
            env.close()
            raise
        return cls(path, env, records, ids)

    def read(self, db: lmdb._Database | None = None) -> AbstractContextManager[lmdb.Transaction[bytes]]:
        """A read transaction; it first adopts the map the writer (in this or another process) grew."""
        return self.guard.transaction(db=db)

    def used_bytes(self) -> int:
        with self.guard.shared() as env:
            return int((env.info()["last_pgno"] + 1) * env.stat()["psize"])

    def close(self) -> None:
        self.guard.close()


def apply_retention(log_dir: Path, keep: Path, max_bytes: int, max_age_s: float, in_use_s: float = 0.0) -> list[Path]:
    """Delete whole segments, oldest first, beyond the byte or age limit; never `keep` (the live one),
    nor a segment that ended less than `in_use_s` ago (other workers may not have left it yet)."""
    segments = [p for p in list_segments(log_dir) if p != keep]
    deleted = []
    now = time.time_ns()
    total = sum(segment_bytes(p) for p in segments) + (segment_bytes(keep) if keep.exists() else 0)
    for i, path in enumerate(segments):
        # A segment's records end where the next segment starts.
        end_ns = segment_start_ns(segments[i + 1]) if i + 1 < len(segments) else segment_start_ns(keep)
        too_old = max_age_s > 0 and (now - end_ns) / 1e9 > max_age_s
        too_big = max_bytes > 0 and total > max_bytes
        if not (too_old or too_big) or (now - end_ns) / 1e9 < in_use_s:
            break
        total -= segment_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
        log.info("request log retention deleted %s", path)
    return deleted
