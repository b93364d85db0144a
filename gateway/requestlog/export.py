"""Export log records as training data: one row per sample (batch row), tensors decoded into columns.

A 2-D tensor `[N, F]` becomes F columns `input.<name>.<j>`, a 1-D tensor `[N]` one column
`input.<name>`, anything else one list-valued column per tensor. JSON Lines needs nothing extra;
Parquet needs pyarrow (the `export` extra).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gateway.datatypes import BY_V2_NAME
from gateway.requestlog.record import Record, Tensor

Row = dict[str, Any]
CHUNK_ROWS = 10_000


def _tensor_columns(kind: str, tensor: Tensor) -> list[dict[str, Any]] | None:
    """Per-row column values of one tensor, or None when its bytes cannot be decoded."""
    dtype = BY_V2_NAME.get(tensor.datatype)
    if dtype is None or not tensor.shape:
        return None
    array = tensor.to_numpy(dtype.numpy)
    prefix = f"{kind}.{tensor.name}"
    if array.ndim == 1:
        return [{prefix: v} for v in array.tolist()]
    if array.ndim == 2:
        return [{f"{prefix}.{j}": v for j, v in enumerate(row)} for row in array.tolist()]
    return [{prefix: row} for row in array.tolist()]


def rows_of(record: Record) -> list[Row]:
    base: Row = {
        "request_id": record.id,
        "ts_ns": record.ts_ns,
        "model": record.model,
        "version": record.version,
        "role": record.role,
        "status": record.status,
        "ood": record.ood,
        "ood_score": record.ood_score,
        "ood_features": record.ood_features,
    }
    per_tensor = [
        columns
        for kind, tensors in (("input", record.inputs), ("output", record.outputs))
        for columns in (_tensor_columns(kind, t) for t in tensors)
        if columns is not None
    ]
    count = max((len(c) for c in per_tensor), default=1)
    rows = []
    for i in range(count):
        row = dict(base, row=i)
        for columns in per_tensor:
            if i < len(columns):
                row.update(columns[i])
        rows.append(row)
    return rows


def _rows(records: Iterable[Record], progress: Callable[[int], None]) -> Iterator[Row]:
    for done, record in enumerate(records, 1):
        yield from rows_of(record)
        progress(done)


def progress_printer(total: int, stream: TextIO = sys.stderr) -> Callable[[int], None]:
    """A one-line progress bar on stderr for long exports (silent when not a terminal)."""
    if not stream.isatty() or total < 1000:
        return lambda done: None

    def show(done: int) -> None:
        if done % 500 == 0 or done == total:
            filled = int(30 * min(done, total) / total)
            stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} records")
            if done >= total:
                stream.write("\n")
            stream.flush()

    return show


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN or Inf
    return value


def export_jsonl(records: Iterable[Record], path: Path, progress: Callable[[int], None]) -> int:
    count = 0
    with open(path, "w") as out:
        for row in _rows(records, progress):
            out.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
            count += 1
    return count


def export_parquet(records: Iterable[Record], path: Path, progress: Callable[[int], None]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("parquet export needs pyarrow: pip install 'canary-gateway[export]'") from None
    writer = None
    count = 0
    chunk: list[Row] = []

    def flush() -> None:
        nonlocal writer
        if not chunk:
            return
        table = pa.Table.from_pylist(chunk, schema=writer.schema if writer else None)
        if writer is None:
            writer = pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
        chunk.clear()

    try:
        for row in _rows(records, progress):
            chunk.append(row)
            count += 1
            if len(chunk) >= CHUNK_ROWS:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return count
