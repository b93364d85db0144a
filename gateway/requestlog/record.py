"""One log record: its fields, its msgpack encoding, and the keys it is stored under.

Records are maps with a format version `v`, so the format can evolve: readers accept every version
they know and report the others. Keys sort by time: `ts_ns | pid | seq` big-endian, so one segment
is a time-ordered B-tree and several worker processes never collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from native.logpack import pack_record

FORMAT_VERSION = 1
KEY = struct.Struct(">QII")  # timestamp ns, process id, sequence number
MAX_ID_KEY_BYTES = 400  # LMDB keys are limited to 511 bytes; longer ids are indexed by their sha256

ROLE_PRIMARY = "primary"
ROLE_SHADOW = "shadow"
ROLE_FALLBACK = "fallback"


def _bytes_of(array: np.ndarray) -> bytes:
    """The array's bytes, without a copy when the array is a whole, contiguous view of a `bytes`
    object (an input decoded zero-copy from `raw_input_contents`)."""
    owner = array.base
    while isinstance(owner, np.ndarray):
        owner = owner.base
    # A contiguous view as long as its whole buffer must start at its beginning: same bytes.
    if type(owner) is bytes and len(owner) == array.nbytes and array.flags.c_contiguous:
        return owner
    return array.tobytes()


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, name: str, datatype: str, array: np.ndarray) -> Tensor:
        return cls(name, datatype, list(array.shape), _bytes_of(array))

    def to_numpy(self, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


@dataclass
class Record:
    """Everything needed to audit, replay or retrain from one request (or one shadow call)."""

    id: str
    ts_ns: int
    model: str
    version: str
    role: str = ROLE_PRIMARY
    status: int = 0  # gRPC status code value; 0 is OK
    message: str = ""
    latency_ns: int = 0
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    primary_id: str | None = None  # for shadows: the primary request they mirror
    caller: str | None = None
    routing_key: str | None = None
    ood_score: float | None = None
    ood: bool | None = None
    ood_features: str | None = None  # when flagged: the furthest features, "x3=+7.2,x10=-5.1"
    trace_id: str | None = None
    sha256: str = ""
    raw_request: bytes | None = None  # the request as received, when it could not be decoded
    segments: dict[str, str] | None = None  # declared `segment.NAME` request parameters (never seen by the model)
    worker: int | None = None  # the worker process that answered (`serve --workers N`), stamped by the writer


def _tensors_out(tensors: list[Tensor]) -> list[list[Any]]:
    return [[t.name, t.datatype, t.shape, t.data] for t in tensors]


def _tensors_in(items: list[list[Any]]) -> list[Tensor]:
    return [Tensor(name, datatype, list(shape), data) for name, datatype, shape, data in items]


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))
TENSOR_FIELDS = frozenset(("inputs", "outputs"))


def encode(record: Record) -> bytes:
    """A msgpack map of the record's fields (tensors as [name, datatype, shape, bytes]) plus `v`:
    written by `native.logpack`, or by msgpack itself for a value of a type only msgpack knows."""
    try:
        return pack_record(record, RECORD_FIELDS, TENSOR_FIELDS, FORMAT_VERSION)
    except TypeError:
        return msgpack_encode(record)


def msgpack_encode(record: Record) -> bytes:
    """`encode` by msgpack: the reference the native writer matches byte for byte."""
    values: dict[str, Any] = {name: getattr(record, name) for name in RECORD_FIELDS}
    for name in TENSOR_FIELDS:
        values[name] = [[t.name, t.datatype, t.shape, t.data] for t in values[name]]
    values["v"] = FORMAT_VERSION
    return msgpack.packb(values, use_bin_type=True)


class RecordFormatError(ValueError):
    """A stored value is not a record this version can read."""


def decode(data: bytes) -> Record:
    try:
        values = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise RecordFormatError(f"undecodable record: {e}") from e
    version = values.get("v") if isinstance(values, dict) else None
    if version != FORMAT_VERSION:
        raise RecordFormatError(f"unknown record format version {version!r}")
    try:
        for name in TENSOR_FIELDS:
            values[name] = [Tensor(n, datatype, list(shape), raw) for n, datatype, shape, raw in values[name]]
        # A field added after a record was written takes its default (required ones must be there).
        return Record(**{name: values[name] for name in RECORD_FIELDS if name in values})
    except (KeyError, TypeError, ValueError) as e:
        raise RecordFormatError(f"malformed record: {e}") from e


def id_key(request_id: str) -> bytes:
    raw = request_id.encode()
    return raw if len(raw) <= MAX_ID_KEY_BYTES else b"sha256:" + hashlib.sha256(raw).digest()


class KeyMaker:
    """Time-ordered unique keys for this process."""

    def __init__(self) -> None:
        self._pid = os.getpid() & 0xFFFFFFFF
        self._seq = 0

    def make(self, ts_ns: int) -> bytes:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return KEY.pack(ts_ns, self._pid, self._seq)


def key_time_ns(key: bytes) -> int:
    return int(KEY.unpack(key)[0])
