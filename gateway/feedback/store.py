"""The feedback store: ground truth per logged request id, in its own LMDB beside the request log.

One record per request id (a repeat overwrites it, and the overwrite is counted), so truth can be
corrected by sending it again. Values are a fixed struct, not msgpack: ingest runs beside inference
on the same core, and packing 33 bytes costs a fraction of a microsecond. Batches are written in one
short transaction by the ingest process (`ingester`), never on the request path; readers never block it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from gateway.mapguard import MapGuard, opening
from gateway.requestlog.record import id_key

TRUTH_DB = b"truth"
MAP_SIZE = 1 << 30  # grows on demand; the file is sparse
# kind (0: class label, 1: value), truth, observed ns, weight, received ns
VALUE = struct.Struct("<Bdqdq")
RECORD = np.dtype(  # the same layout, for packing a whole batch at once
    [("kind", "u1"), ("truth", "<f8"), ("observed_ns", "<i8"), ("weight", "<f8"), ("received_ns", "<i8")]
)
KIND_LABEL = 0
KIND_VALUE = 1


@dataclass(frozen=True)
class Truth:
    """What actually happened for one request: a class label or a value, when it was observed, its weight."""

    kind: int
    truth: float
    observed_ns: int
    weight: float = 1.0
    received_ns: int = 0

    @property
    def is_label(self) -> bool:
        return self.kind == KIND_LABEL

    def pack(self) -> bytes:
        return VALUE.pack(self.kind, self.truth, self.observed_ns, self.weight, self.received_ns)

    @classmethod
    def unpack(cls, data: bytes) -> Truth:
        return cls(*VALUE.unpack(data))


class FeedbackStore:
    """Writers in several processes (LMDB serialises them: ingest processes); readers from any thread."""

    def __init__(self, directory: Path, map_size: int = MAP_SIZE) -> None:
        self.path = directory
        directory.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(directory), map_size=map_size, max_dbs=1, metasync=False, max_readers=256)
        self._db = opening(env, lambda: env.open_db(TRUTH_DB))  # another ingest process may be growing it
        # Workers (`--workers N`) each open the store: when one grows the map, the others adopt it.
        self._guard = MapGuard(env)

    def put(self, items: Sequence[tuple[str, Truth]]) -> tuple[int, int]:
        """Store every item in one transaction; return (stored, overwritten)."""
        return self.put_packed([(id_key(request_id), truth.pack()) for request_id, truth in items])

    def put_packed(self, pairs: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        """(id key, packed truth) pairs, keys distinct, in one transaction; return (stored, overwritten)."""
        while True:
            try:
                with self._guard.transaction(write=True, db=self._db) as txn:
                    before = txn.stat(self._db)["entries"]
                    pairs.sort()  # B-tree pages in order
                    txn.cursor().putmulti(pairs)
                    # What did not add an entry replaced one: counted without looking every key up first.
                    existing = len(pairs) - (txn.stat(self._db)["entries"] - before)
                break
            except lmdb.MapFullError:
                self._guard.grow(self._guard.env.info()["map_size"] * 2)
        return len(pairs), existing

    def get_many(self, request_ids: Iterable[str]) -> dict[bytes, Truth]:
        """Truth by `id_key(request_id)` for those ids that have one."""
        keys = sorted({id_key(i) for i in request_ids if i})
        with self._guard.transaction(db=self._db) as txn:
            return {key: Truth.unpack(value) for key, value in txn.cursor().getmulti(keys)}

    def count(self) -> int:
        with self._guard.transaction() as txn:
            return int(txn.stat(self._db)["entries"])

    def close(self) -> None:
        self._guard.close()
