"""Export log records as training data: one row per sample (batch row), tensors decoded into columns.

A 2-D tensor `[N, F]` becomes F columns `input.<name>.<j>`, a 1-D tensor `[N]` one column
`input.<name>`, anything else one list-valued column per tensor. JSON Lines needs nothing extra;
Parquet needs pyarrow (the `export` extra).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gateway.datatypes import BY_V2_NAME
from gateway.requestlog.record import Record, Tensor

Row = dict[str, Any]
# A column's type as the records declare it: a protocol datatype name ("FP32", "UINT64", ...) or
# "STRING", and how many list levels wrap it (a 3-D tensor's rows are lists of lists).
ColumnType = tuple[str, int]
CHUNK_ROWS = 10_000
BASE_COLUMNS: dict[str, ColumnType] = {
    "request_id": ("STRING", 0),
    "ts_ns": ("INT64", 0),
    "model": ("STRING", 0),
    "version": ("STRING", 0),
    "role": ("STRING", 0),
    "status": ("INT64", 0),
    "ood": ("BOOL", 0),
    "ood_score": ("FP64", 0),
    "ood_features": ("STRING", 0),
    "row": ("INT64", 0),
}


def _tensor_columns(kind: str, tensor: Tensor) -> tuple[list[Row], dict[str, ColumnType]] | None:
    """Per-row column values of one tensor and their types, or None when its bytes cannot be decoded."""
    dtype = BY_V2_NAME.get(tensor.datatype)
    if dtype is None or not tensor.shape:
        return None
    array = tensor.to_numpy(dtype.numpy)
    prefix = f"{kind}.{tensor.name}"
    if array.ndim == 1:
        return [{prefix: v} for v in array.tolist()], {prefix: (tensor.datatype, 0)}
    if array.ndim == 2:
        names = [f"{prefix}.{j}" for j in range(array.shape[1])]
        rows = [dict(zip(names, row, strict=True)) for row in array.tolist()]
        return rows, {name: (tensor.datatype, 0) for name in names}
    return [{prefix: row} for row in array.tolist()], {prefix: (tensor.datatype, array.ndim - 1)}


def columns_of(record: Record) -> tuple[list[Row], dict[str, ColumnType]]:
    """The record's rows, and the type of every column they have (base columns first)."""
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
    types = dict(BASE_COLUMNS)
    per_tensor = []
    for kind, tensors in (("input", record.inputs), ("output", record.outputs)):
        for tensor in tensors:
            decoded = _tensor_columns(kind, tensor)
            if decoded is not None:
                per_tensor.append(decoded[0])
                types.update(decoded[1])
    count = max((len(c) for c in per_tensor), default=1)
    rows = []
    for i in range(count):
        row = dict(base, row=i)
        for columns in per_tensor:
            if i < len(columns):
                row.update(columns[i])
        rows.append(row)
    return rows, types


def _columns(
    records: Iterable[Record], progress: Callable[[int], None]
) -> Iterator[tuple[list[Row], dict[str, ColumnType]]]:
    for done, record in enumerate(records, 1):
        yield columns_of(record)
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
    if isinstance(value, list):  # a 3-D or larger tensor's row: the NaN can be at any depth
        return [_json_value(v) for v in value]
    return value


def export_jsonl(records: Iterable[Record], path: Path, progress: Callable[[int], None]) -> int:
    count = 0
    with open(path, "w") as out:
        for rows, _ in _columns(records, progress):
            for row in rows:
                out.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
                count += 1
    return count


def export_parquet(records: Iterable[Record], path: Path, progress: Callable[[int], None]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("parquet export needs pyarrow: pip install 'canary-gateway[export]'") from None
    scalar = {
        "STRING": pa.string(),
        "BOOL": pa.bool_(),
        "UINT8": pa.uint8(),
        "UINT16": pa.uint16(),
        "UINT32": pa.uint32(),
        "UINT64": pa.uint64(),
        "INT8": pa.int8(),
        "INT16": pa.int16(),
        "INT32": pa.int32(),
        "INT64": pa.int64(),
        "FP16": pa.float16(),
        "FP32": pa.float32(),
        "FP64": pa.float64(),
    }

    def arrow_type(column: ColumnType) -> pa.DataType:
        datatype, depth = column
        result = scalar[datatype]
        for _ in range(depth):
            result = pa.list_(result)
        return result

    def unify(schemas: list[pa.Schema]) -> pa.Schema:
        # A column can change type between records (a new model version takes FP64 where the old
        # one took FP32): widen it rather than fail, and fail by name only when nothing holds both.
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise SystemExit(f"parquet export: a column changes type between records: {e}") from None

    # A Parquet file has one schema, written before the first row, but a column can first appear
    # in any record (outputs after a run of errors, a new model version's inputs). So each chunk is
    # written to a part file with the types its records declare, and the parts are then copied into
    # one file with the union of their schemas: memory stays one chunk, whatever the log's size.
    count = 0
    chunk: list[Row] = []
    chunk_types: dict[str, pa.DataType] = {}
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as parts_dir:
        parts: list[tuple[Path, pa.Schema]] = []

        def flush() -> None:
            if not chunk:
                return
            schema = pa.schema(list(chunk_types.items()))
            part = Path(parts_dir) / f"{len(parts)}.parquet"
            pq.write_table(pa.Table.from_pylist(chunk, schema=schema), part)
            parts.append((part, schema))
            chunk.clear()
            chunk_types.clear()

        for rows, types in _columns(records, progress):
            for name, column in types.items():
                new = arrow_type(column)
                old = chunk_types.setdefault(name, new)
                if old != new:
                    chunk_types[name] = unify([pa.schema([(name, old)]), pa.schema([(name, new)])]).field(name).type
            chunk.extend(rows)
            count += len(rows)
            if len(chunk) >= CHUNK_ROWS:
                flush()
        flush()
        # The base columns come first, and are all there is when no record matched.
        schema = unify([pa.schema([(n, arrow_type(c)) for n, c in BASE_COLUMNS.items()])] + [s for _, s in parts])
        with pq.ParquetWriter(str(path), schema) as writer:
            writer.write_table(schema.empty_table())
            for part, _ in parts:
                table = pq.read_table(part)
                columns = [
                    table.column(field.name).cast(field.type)
                    if field.name in table.column_names
                    else pa.nulls(len(table), field.type)
                    for field in schema
                ]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return count
