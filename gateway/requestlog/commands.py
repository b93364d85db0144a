"""`canary-gateway log tail | get | query | export`: read the request log from the command line.

They read the same default location as the gateway (`<state_dir>/log`, `./gateway-state/log`),
so on one machine `canary-gateway log get ID` works with no flags; `--log-dir` overrides.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from gateway.config import ServerConfig
from gateway.requestlog.export import export_jsonl, export_parquet, progress_printer
from gateway.requestlog.reader import LogReader, Query
from gateway.requestlog.record import Record

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str) -> int:
    """ns since the epoch from `10m` / `2h` / `1d` ago, an ISO-8601 time, or integer ns."""
    match = _RELATIVE.match(text)
    if match:
        return time.time_ns() - int(float(match.group(1)) * _UNIT_S[match.group(2)] * 1e9)
    if text.isdecimal():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use 10m, 2h, 1d, ISO-8601 or ns)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1e9)


def _status_code(text: str) -> int:
    if text.isdecimal():
        return int(text)
    try:
        return int(grpc.StatusCode[text.upper()].value[0])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown status {text!r} (e.g. OK, INVALID_ARGUMENT, 3)") from None


def _status_name(code: int) -> str:
    return next((s.name for s in grpc.StatusCode if s.value[0] == code), str(code))


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _as_json(record: Record) -> dict[str, Any]:
    data = dataclasses.asdict(record)

    def encode(value: Any) -> Any:
        if isinstance(value, bytes):
            return base64.b64encode(value).decode()
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        return value

    result: dict[str, Any] = encode(data)
    result["time"] = _iso(record.ts_ns)
    result["status_name"] = _status_name(record.status)
    return result


def _line(record: Record) -> str:
    ood = "" if record.ood is None else (" OOD" if record.ood else "")
    return (
        f"{_iso(record.ts_ns)}  {record.id:<28} {record.model}:{record.version or '-':<4} {record.role:<8} "
        f"{_status_name(record.status):<18} {record.latency_ns / 1e6:8.3f} ms{ood}"
    )


def _detail(record: Record) -> str:
    lines = [_line(record)]
    if record.message:
        lines.append(f"  message: {record.message}")
    if record.primary_id:
        lines.append(f"  shadow of: {record.primary_id}")
    for label, value in (("caller", record.caller), ("routing key", record.routing_key), ("trace", record.trace_id)):
        if value:
            lines.append(f"  {label}: {value}")
    if record.sha256:
        lines.append(f"  model sha256: {record.sha256}")
    for kind, tensors in (("input", record.inputs), ("output", record.outputs)):
        for t in tensors:
            lines.append(f"  {kind} {t.name}: {t.datatype} {t.shape} ({len(t.data)} bytes)")
    if record.raw_request is not None:
        lines.append(f"  raw request kept: {len(record.raw_request)} bytes (not decodable)")
    return "\n".join(lines)


def _print(records: list[Record], as_json: bool, detail: bool = False) -> None:
    for record in records:
        if as_json:
            print(json.dumps(_as_json(record)))
        else:
            print(_detail(record) if detail else _line(record))


def _query(args: argparse.Namespace) -> Query:
    return Query(args.model, args.version, args.role, args.status, args.ood, args.since, args.until)


def run(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir) if args.log_dir else Path(args.state_dir) / "log"
    if not log_dir.is_dir():
        print(f"canary-gateway log: no request log at {log_dir}", file=sys.stderr)
        return 1
    reader = LogReader(log_dir)
    if args.log_command == "get":
        records = reader.get(args.request_id)
        if not records:
            print(f"canary-gateway log: no record for request id {args.request_id!r} in {log_dir}", file=sys.stderr)
            return 1
        _print(records, args.json, detail=True)
    elif args.log_command == "tail":
        _print(reader.tail(args.n), args.json)
    elif args.log_command == "query":
        matched = []
        for record in reader.query(_query(args)):
            matched.append(record)
            if len(matched) >= args.limit:
                break
        _print(matched, args.json)
    else:
        exporter = export_parquet if args.format == "parquet" else export_jsonl
        rows = exporter(reader.query(_query(args)), Path(args.output), progress_printer(reader.count()))
        print(f"exported {rows} rows to {args.output}", file=sys.stderr)
    for problem in reader.problems:
        print(f"canary-gateway log: warning: {problem}", file=sys.stderr)
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("log", help="read the request log (works while the gateway runs)")
    parser.add_argument("--log-dir", help="the log directory (default: <state-dir>/log)")
    parser.add_argument("--state-dir", default=ServerConfig.state_dir, help="the gateway's state directory")
    sub = parser.add_subparsers(dest="log_command", required=True)

    get = sub.add_parser("get", help="a request's record (and its shadows') by request id")
    get.add_argument("request_id")
    tail = sub.add_parser("tail", help="the newest records")
    tail.add_argument("-n", type=int, default=20)
    query = sub.add_parser("query", help="records matching filters, oldest first")
    query.add_argument("--limit", type=int, default=1000)
    export = sub.add_parser("export", help="export matching records as training data")
    export.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    export.add_argument("--output", "-o", required=True)
    for p in (get, tail, query, export):
        p.add_argument("--json", action="store_true", help="one JSON object per record")
    for p in (query, export):
        p.add_argument("--model")
        p.add_argument("--version")
        p.add_argument("--role", choices=["primary", "shadow", "fallback"])
        p.add_argument("--status", type=_status_code, help="OK, INVALID_ARGUMENT, ... or a code number")
        p.add_argument("--ood", action=argparse.BooleanOptionalAction, default=None)
        p.add_argument("--since", type=parse_time, help="10m, 2h, 1d, ISO-8601 or ns")
        p.add_argument("--until", type=parse_time)
    parser.set_defaults(func=run)
